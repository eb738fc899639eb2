"""Observability: `GET /metrics` across workers, X-Request-ID, and the request id in the logs.

The metrics tests run a real 2-worker server: each scrape is answered by whichever worker
accepts the connection, so totals must be the same whoever answers, and must add up to what
the clients saw (turns, tokens, cost, errors, retries).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import websockets
from prometheus_client import multiprocess
from prometheus_client.parser import text_string_to_metric_families

from .harness import Server, eventually

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every label set that includes `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def scrape(server: Server) -> Samples:
    # A new connection each time: any worker may answer.
    r = httpx.get(server.url + "/metrics", timeout=10, headers={"Connection": "close"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def per_worker(directory: Path, name: str) -> dict[int, float]:
    """A metric's value per worker pid, read from the multiprocess files themselves."""
    out: dict[int, float] = {}
    for path in glob.glob(str(directory / "counter_*.db")):
        pid = int(re.search(r"_(\d+)\.db$", path).group(1))
        for metric in multiprocess.MultiProcessCollector.merge([path]):
            for s in metric.samples:
                if s.name == name:
                    out[pid] = out.get(pid, 0.0) + s.value
    return out


def workers_of(server: Server) -> list[int]:
    """uvicorn's worker processes (not multiprocessing's resource tracker)."""
    return [pid for pid in server.worker_pids()
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


async def post_turn(server: Server, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers={"Connection": "close"}) as client:
        return await client.post("/agent", json=body)


async def test_counts_add_up_across_two_workers(start_server, upstream, tmp_path):
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale file from an earlier run")
    server = start_server(workers=2, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), ANTHROPIC_MAX_RETRIES=2)
    assert not (metrics_dir / "counter_999999.db").exists(), "the supervisor wipes stale files at start"
    pids = workers_of(server)
    assert len(pids) == 2

    # Turns on fresh connections until both workers have run some (the kernel picks).
    results: list[dict] = []
    deadline = time.monotonic() + 60
    while True:
        batch = await asyncio.gather(*(post_turn(server, {"message": f"hello #fake{{\"text\": \"answer {i}\"}}"})
                                       for i in range(len(results), len(results) + 6)))
        for r in batch:
            assert r.status_code == 200, r.text
            results.append(r.json())
        by_pid = per_worker(metrics_dir, "agent_turns_total")
        if len([p for p in pids if by_pid.get(p)]) == 2 or time.monotonic() > deadline:
            break
    assert all(by_pid.get(p) for p in pids), f"both workers ran turns: {by_pid}"

    # One upstream failure (no retry: 400 is final) and one turn that needed an SDK retry.
    upstream.script({"status": 400, "error_type": "invalid_request_error", "message": "nope"})
    r = await post_turn(server, {"message": "fails"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    upstream.script({"status": 529, "retry_after_ms": 20}, {"text": "after a retry"})
    r = await post_turn(server, {"message": "retried"})
    assert r.status_code == 200 and r.json()["text"] == "after a retry"
    results.append(r.json())

    completed = len(results)
    usage = {k: sum(r["usage"][k] for r in results) for k in results[0]["usage"]}
    cost = sum(r["estimated_cost_usd"] for r in results)

    async def settled():
        s = scrape(server)
        return s if total(s, "agent_turns_total") == completed + 1 else None

    assert await eventually(settled, timeout=10), "every finished turn is counted"
    for _ in range(8):  # whichever worker answers, the totals are the same
        s = scrape(server)
        assert value(s, "agent_turns_total", outcome="completed") == completed
        assert value(s, "agent_turns_total", outcome="failed") == 1
        assert value(s, "agent_turns_started_total") == completed + 1
        assert value(s, "agent_upstream_errors_total", code="bad_request") == 1
        assert value(s, "agent_upstream_retries_total") == 1
        assert value(s, "agent_upstream_requests_total") == completed + 2
        model = results[0]["model"]
        assert value(s, "agent_tokens_total", model=model, kind="input") == usage["input_tokens"]
        assert value(s, "agent_tokens_total", model=model, kind="output") == usage["output_tokens"]
        assert value(s, "agent_tokens_total", model=model, kind="cache_read") == usage["cache_read_input_tokens"]
        assert value(s, "agent_tokens_total", model=model, kind="cache_write") == usage["cache_creation_input_tokens"]
        assert value(s, "agent_cost_usd_total", model=model) == pytest.approx(cost, rel=1e-6)
        assert value(s, "agent_http_requests_total", method="POST", route="/agent", status="200") == completed
        assert value(s, "agent_http_requests_total", method="POST", route="/agent", status="400") == 1
        assert value(s, "agent_time_to_first_token_seconds_count") == completed
        assert value(s, "agent_turn_duration_seconds_count", outcome="completed") == completed
        assert value(s, "agent_turn_duration_seconds_bucket", outcome="completed", le="+Inf") == completed


async def test_live_gauges_and_a_killed_worker(start_server, upstream, tmp_path):
    metrics_dir = tmp_path / "prom"
    server = start_server(workers=2, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        async with client.stream("POST", "/agent/stream",
                                 json={"message": 'slow #fake{"tokens": 200, "pace_ms": 50}'}) as sse:
            assert sse.status_code == 200
            async with websockets.connect(f"{server.ws_url}/agent/ws") as ws:
                s = scrape(server)
                assert value(s, "agent_active_sse_streams", route="/agent/stream") == 1
                assert value(s, "agent_active_websockets", route="/agent/ws") == 1
                await ws.send(json.dumps({"type": "ping"}))
                assert json.loads(await ws.recv()) == {"type": "pong"}
            s = await eventually(lambda: (lambda s: s if value(s, "agent_active_websockets",
                                                                    route="/agent/ws") == 0 else None)(scrape(server)))
            assert s, "a closed WebSocket no longer counts"
            assert value(s, "agent_http_requests_total", method="WS", route="/agent/ws", status="101") == 1

            # SIGKILL the worker holding the stream: no shutdown code runs there, yet the
            # next scrape must not count its stream any more.
            holder = [int(re.search(r"_(\d+)\.db$", p).group(1))
                      for p in glob.glob(str(metrics_dir / "gauge_livesum_*.db"))
                      if any(s.value == 1 for m in multiprocess.MultiProcessCollector.merge([p])
                             for s in m.samples if s.name == "agent_active_sse_streams")]
            assert len(holder) == 1
            os.kill(holder[0], signal.SIGKILL)
    s = await eventually(lambda: (lambda s: s if value(s, "agent_active_sse_streams",
                                                       route="/agent/stream") == 0 else None)(scrape(server)),
                         timeout=15)
    assert s, "a dead worker's live gauges are dropped"
    assert value(s, "agent_turns_started_total") == 1, "counters of a dead worker are kept"


async def test_single_worker_uses_the_in_memory_registry(shared_server):
    r = httpx.get(shared_server.url + "/metrics")
    assert r.status_code == 200
    s = parse(r.text)
    assert ("agent_turns_started_total", frozenset()) in s
    assert "process_cpu_seconds_total" in r.text, "one process: the default collectors are there"


async def test_procfile_style_uvicorn_workers_share_a_directory(upstream, redis_url, tmp_path):
    """`uvicorn --workers 2` started directly (Procfile, Dockerfile): no supervisor hook, no
    PROMETHEUS_MULTIPROC_DIR; the workers find one directory through their parent."""
    import subprocess
    import sys

    from .harness import LOG_DIR, ROOT, server_env

    env = server_env(upstream, redis_url, WEB_CONCURRENCY=2)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["TMPDIR"] = str(tmp_path)
    port = env["PORT"]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = open(LOG_DIR / f"uvicorn-cli-{port}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "server.app:app", "--host", "127.0.0.1",
                             "--port", port, "--workers", "2"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        async def ready():
            try:
                return httpx.get(url + "/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert await eventually(ready, timeout=30)
        dirs = glob.glob(str(tmp_path / f"agent-metrics-w-{proc.pid}-*"))
        assert len(dirs) == 1, os.listdir(tmp_path)
        n = 8
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            responses = await asyncio.gather(*(client.post(url + "/agent", json={"message": "hi"})
                                               for _ in range(n)))
        assert all(r.status_code == 200 for r in responses)
        for _ in range(4):
            s = parse(httpx.get(url + "/metrics", headers={"Connection": "close"}).text)
            assert value(s, "agent_turns_total", outcome="completed") == n
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


# -- request ids -----------------------------------------------------------------------------
async def test_request_id_is_echoed_validated_and_logged(shared_server, upstream):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = await client.get("/health", headers={"X-Request-ID": "client-id_1.2:3"})
        assert r.headers["x-request-id"] == "client-id_1.2:3"
        generated = (await client.get("/health")).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        for bad in ("x" * 129, "has space", "quote\"", "new\\nline", ""):
            r = await client.get("/health", headers={"X-Request-ID": bad})
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), bad
        r = await client.get("/no/such/route", headers={"X-Request-ID": "on-404"})
        assert r.status_code == 404 and r.headers["x-request-id"] == "on-404"
        r = await client.post("/agent", content=b"{not json", headers={"X-Request-ID": "on-400"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "on-400"

        async with client.stream("POST", "/agent/stream", json={"message": "hi"},
                                 headers={"X-Request-ID": "sse-request-7"}) as sse:
            assert sse.headers["x-request-id"] == "sse-request-7"
            session_id = sse.headers["x-session-id"]
            async for _ in sse.aiter_lines():
                pass
        r = await client.post("/agent", json={"message": "again", "session_id": session_id},
                              headers={"X-Request-ID": "json-request-8"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "json-request-8"

    async with websockets.connect(f"{shared_server.ws_url}/agent/ws",
                                  additional_headers={"X-Request-ID": "ws-request-9"}) as ws:
        assert ws.response.headers["x-request-id"] == "ws-request-9"
        await ws.send(json.dumps({"type": "message", "message": "over ws"}))
        while json.loads(await ws.recv())["type"] != "turn_end":
            pass

    def turn_lines():
        lines = []
        for line in shared_server.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"event": "turn"' in line:
                lines.append(json.loads(line))
        return lines

    async def logged():
        ids = {line.get("request_id") for line in turn_lines()}
        return {"sse-request-7", "json-request-8", "ws-request-9"} <= ids

    assert await eventually(logged, timeout=5), "each turn's log line names the request that started it"
    line = next(x for x in turn_lines() if x.get("request_id") == "json-request-8")
    assert line["session_id"] == session_id and line["outcome"] == "completed"
    assert not any('"text_delta"' in x for x in shared_server.log_path.read_text().splitlines()), \
        "no per-token log lines"


async def test_unhandled_errors_still_carry_the_request_id():
    """Starlette answers unhandled exceptions outside user middleware; ours answers first."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from server.middleware import RequestContext
    from server.transports.errors import EXCEPTION_HANDLERS

    async def broken(request):
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/broken", broken)], exception_handlers=EXCEPTION_HANDLERS)
    app.add_middleware(RequestContext)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/broken", headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
    assert r.headers["x-request-id"] == "boom-1"


def test_an_empty_multiproc_dir_variable_means_unset(tmp_path):
    """`PROMETHEUS_MULTIPROC_DIR=` (a copied .env.example) must not scatter files in the cwd."""
    import subprocess
    import sys

    from .harness import ROOT

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", "import server.metrics as m; m.turn_started(); "
                           "print(m.MULTIPROC_DIR)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert list(tmp_path.iterdir()) == []


_SPAWNED_WORKER = """
import importlib, multiprocessing, sys
import server.metrics
if sys.argv[1] == "setup":
    target, args = server.metrics.setup, ()
else:
    target, args = importlib.import_module, ("server.metrics",)
worker = multiprocessing.get_context("spawn").Process(target=target, args=args)
worker.start()
worker.join()
sys.exit(worker.exitcode)
"""


@pytest.mark.parametrize("given_dir", [False, True])
def test_importing_metrics_touches_no_files(tmp_path, given_dir):
    """The multiprocess directory is set up at worker startup, not at import: even in a spawned
    worker (where startup picks a directory) importing server.metrics creates no file."""
    import subprocess
    import sys

    from .harness import ROOT

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    if given_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    for step in ("import", "setup"):
        done = subprocess.run([sys.executable, "-c", _SPAWNED_WORKER, step], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        if step == "import":
            assert list(tmp_path.iterdir()) == [], "importing server.metrics touched no file"
    assert list(tmp_path.iterdir()) != [], "setup() (worker startup) does create the directory"


async def test_tool_calls_are_counted_and_timed_by_tool_and_outcome(shared_server, upstream):
    def calls(samples: Samples) -> dict[str, float]:
        return {outcome: value(samples, "agent_tool_calls_total", tool=tool, outcome=outcome)
                for tool, outcome in (("calculator", "ok"), ("calculator", "invalid"), ("<unknown>", "invalid"))}

    before = scrape(shared_server)
    upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "2+2"}},
                                  {"name": "calculator", "input": {}},
                                  {"name": "no_such_tool", "input": {}}]},
                    {"text": "Done."})
    r = await post_turn(shared_server, {"message": "Compute"})
    assert r.status_code == 200, r.text
    after = scrape(shared_server)
    assert {k: after_v - calls(before)[k] for k, after_v in calls(after).items()} == {"ok": 1, "invalid": 1}
    assert value(after, "agent_tool_calls_total", tool="<unknown>", outcome="invalid") \
        - value(before, "agent_tool_calls_total", tool="<unknown>", outcome="invalid") == 1
    # Only runs are timed (an invalid call never ran).
    assert value(after, "agent_tool_duration_seconds_count", tool="calculator") \
        - value(before, "agent_tool_duration_seconds_count", tool="calculator") == 1


async def test_latency_histograms_carry_trace_exemplars_in_openmetrics(start_server, upstream):
    """With tracing on and one worker (prometheus-client keeps no exemplars in multiprocess mode),
    a scraper asking for OpenMetrics gets the trace id of a recent sample in each latency bucket."""
    server = start_server(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_BSP_SCHEDULE_DELAY="60000")
    upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "6*7"}}]}, {"text": "42."})
    r = await post_turn(server, {"message": "6*7?"})
    assert r.status_code == 200, r.text
    plain = httpx.get(server.url + "/metrics")
    assert plain.headers["content-type"].startswith("text/plain") and "trace_id" not in plain.text
    om = httpx.get(server.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    for metric in ("agent_tool_duration_seconds_bucket", "agent_turn_duration_seconds_bucket",
                   "agent_time_to_first_token_seconds_bucket"):
        assert re.search(rf'^{metric}{{[^}}]*}} \S+ # {{trace_id="[0-9a-f]{{32}}"}}', om.text, re.M), metric
