"""The benchmark: our server vs. a seed-pattern app vs. the fake upstream itself.

    scripts/bench                 full run (a few minutes)
    scripts/bench --quick         smaller numbers (under a minute)
    scripts/bench --only 1,5      some sections (1 stream CPU, 2 stretch, 3 short turns,
                                  4 TTFT, 5 memory, 6 Redis, 7 seed/floor comparison,
                                  8 Redis sizing: what one Redis node carries, 9 tool loop:
                                  CPU per model call of tool-calling turns, and one MCP call's cost,
                                  10 start: process start to /ready, five starts, 11 burst:
                                  --concurrency new streams sent at the same instant)
    scripts/bench --tracing       also "otel": ours with OpenTelemetry tracing at 100% sampling
                                  (sections 1-4), exporting OTLP/HTTP to a sink in this process

Prints a table (and writes it to bench-results/latest.txt). No thresholds are enforced: the
targets from the issue are printed beside the figures. Everything runs on 127.0.0.1: a
private redis-server, the project's fake Anthropic API (on uvloop), the server under test as
a subprocess, and the load generator in its own process (bench/loadgen.py); CPU is read from
/proc/<pid>/stat of the server process(es) only (uvicorn supervisor + workers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from . import procs, sizing
from .otlp_sink import OtlpSink
from .procs import API_KEY, RESULTS, Fake, LoadGen, Redis, Server, proc_cpu
from .redis_proxy import RedisProxy

MODEL = "claude-sonnet-4-5"
SECTION_NAMES = {"1": "stream", "2": "stretch", "3": "turn", "4": "ttft", "5": "memory", "6": "redis",
                 "7": "compare", "8": "sizing", "9": "tools", "10": "start", "11": "burst"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MCP_TEST_SERVER = os.path.join(ROOT, "tests", "mcp_server.py")


# -- small helpers -------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = (len(vals) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(v: float | None, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}f}{unit}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}x"


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def http_stream(url: str, body: dict[str, Any], timeout: float = 60) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().count(b"text_delta")


def box_busy(interval: float) -> float:
    """Fraction of all cores busy over `interval` seconds (/proc/stat)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        return sum(parts) - parts[3] - parts[4], sum(parts)
    b0, t0 = read()
    time.sleep(interval)
    b1, t1 = read()
    return (b1 - b0) / max(t1 - t0, 1)


def git_describe() -> str:
    """Read-only: the commit under test and whether the work tree differs from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=procs.ROOT, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "server"],
                               capture_output=True, text=True, cwd=procs.ROOT, timeout=5).stdout.strip()
        return f"{rev}{' + uncommitted changes in server/' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def directive(**kw: Any) -> str:
    return "#fake" + json.dumps(kw, separators=(",", ":"))


# -- what each target is asked ---------------------------------------------------------------
@dataclass
class Target:
    name: str                   # ours | seed | floor
    host: str
    port: int
    cpu_pids: list[int]         # the process(es) whose CPU is "the server" for this target
    server: Server | None = None
    results: dict[str, Any] = field(default_factory=dict)

    def stream_spec(self, text: str) -> dict[str, Any]:
        if self.name == "floor":
            return {"path": "/v1/messages", "headers": {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
                    "body": {"model": MODEL, "max_tokens": 4096, "stream": True,
                             "messages": [{"role": "user", "content": text}]}}
        return {"path": "/agent/stream", "headers": {"Accept": "text/event-stream"}, "body": {"message": text}}

    def turn_spec(self, text: str, session_every: int) -> dict[str, Any]:
        if self.name == "floor":
            return {"path": "/v1/messages", "headers": {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
                    "body": {"model": MODEL, "max_tokens": 4096, "messages": [{"role": "user", "content": text}]},
                    "collect_json": True}
        return {"path": "/agent", "body": {"message": text}, "session_every": session_every}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.redis: Redis | None = None
        self.fake: Fake | None = None
        self.notes: list[str] = []
        self.targets: dict[str, Target] = {}
        self.server_logs: list[tuple[str, int, list[tuple[int, str]]]] = []
        self.quiet_waits: list[str] = []
        self.sink: OtlpSink | None = None  # the OTLP receiver of the "otel" target (--tracing)

    def stop_server(self, label: str, server: Server) -> None:
        """Stop a server; report warnings/errors from its log (incl. those logged while it drained)
        and any SIGTERM it got before ours."""
        try:
            sigterms, _ = server.log_problems()
        except OSError:
            sigterms = 0
        server.stop()
        try:
            _, problems = server.log_problems()
        except OSError:
            problems = []
        self.server_logs.append((label, sigterms, problems))
        if sigterms:
            self.notes.append(f"{label}: the server got a SIGTERM the benchmark did not send (someone's broad "
                              f"pkill?); its figures are not valid")

    def wait_quiet(self, what: str) -> None:
        """Wait (up to --quiet-wait s) until the rest of the box is mostly idle: the machine is shared."""
        limit = self.a.quiet_wait
        if limit <= 0:
            return
        deadline, busy = time.monotonic() + limit, 1.0
        while True:
            busy = box_busy(0.5)
            if busy <= self.a.quiet_level or time.monotonic() >= deadline:
                break
        if busy > self.a.quiet_level:
            self.quiet_waits.append(f"{what}: started with the box {busy * 100:.0f}% busy after waiting {limit:.0f} s")
            log(f"{what}: box still {busy * 100:.0f}% busy after {limit:.0f} s; going ahead")

    # -- orchestration ---------------------------------------------------------------------
    def run(self) -> str:
        a = self.a
        t_start = time.monotonic()
        self.redis = Redis(a.redis_url)
        self.fake = Fake()
        log(f"redis {self.redis.url} ({'private' if self.redis.private else 'external'}), fake {self.fake.url}")
        if "otel" in a.targets:
            self.sink = OtlpSink().start()
            log(f"otel: OTLP sink on {self.sink.endpoint}")
        want = a.sections
        load_sections = [s for s in ("1", "3", "4", "11") if s in want or ("2" in want and s == "1")]
        try:
            if load_sections:
                for name in a.targets:
                    self._run_target(name, load_sections)
            if "5" in want:
                self.section_memory()
            if "6" in want:
                self.section_redis()
            if "8" in want:
                self.section_sizing()
            if "9" in want:
                self.section_tools()
            if "10" in want:
                self.section_start()
        finally:
            if self.sink is not None:
                self.sink.stop()
        report = self.render(time.monotonic() - t_start)
        return report

    def otel_env(self) -> dict[str, str]:
        """Tracing on for the "otel" target only: every span sampled, the SDK's other defaults
        (batch span processor: 5 s schedule delay, 512-span batches, a 2048-span queue)."""
        assert self.sink is not None
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.sink.endpoint, "OTEL_SERVICE_NAME": "bench-otel",
                "OTEL_TRACES_SAMPLER": "always_on"}

    def _lg_run(self, lg: LoadGen, target: Target, spec: dict[str, Any], clients: int, rounds: int,
                ramp: float = 0.0, timeout: float = 120.0) -> dict[str, Any]:
        assert self.fake is not None and self.redis is not None
        cpu_pids = {"server": target.cpu_pids, "fake": [self.fake.proc.pid], "redis": self.redis.pids()}
        if target.name == "floor":
            cpu_pids["fake"] = []
        cmd = {"cmd": "run", "host": target.host, "port": target.port, "clients": clients, "rounds": rounds,
               "ramp_s": ramp, "timeout": timeout, "cpu_pids": cpu_pids, **spec}
        return lg.call(cmd)

    def _run_target(self, name: str, sections: list[str]) -> None:
        a = self.a
        assert self.fake is not None and self.redis is not None
        server = None
        if name == "floor":
            t = Target(name, "127.0.0.1", self.fake.port, [self.fake.proc.pid])
        else:
            log(f"starting {name} server ({a.workers} worker{'s' if a.workers > 1 else ''})")
            if name == "otel":  # ours, traced
                server = Server("ours", self.fake, self.redis.url, workers=a.workers, extra_env=self.otel_env(),
                                tag="-otel")
            else:
                server = Server(name, self.fake, self.redis.url, workers=a.workers)
            t = Target(name, "127.0.0.1", server.port, server.pids(), server)
        self.targets[name] = t
        lg = LoadGen(f"-{name}")
        try:
            # warm-up: imports, connection pools, Lua scripts, code paths
            warm = self._lg_run(lg, t, t.stream_spec(directive(tokens=10, pace_ms=5)), 20, 2)
            self._lg_run(lg, t, t.turn_spec(directive(tokens=5), 2), 10, 2)
            if warm["errors"]:
                log(f"{name}: warm-up errors {warm['errors']}")
            if server is not None:
                t.cpu_pids = server.pids()
            if "1" in sections:
                self.load_stream(lg, t)
            if "3" in sections:
                self.load_turns(lg, t)
            if "11" in sections:
                self.load_burst(lg, t)
            if "4" in sections:
                self.load_ttft(lg, t)
        finally:
            lg.stop()
            if server is not None:
                self.stop_server(name, server)
            if name == "otel" and self.sink is not None:  # (the server flushed its spans as it stopped)
                t.results["sink"] = self.sink.snapshot()

    # -- sections 1 + 2: paced streams ---------------------------------------------------------
    def load_stream(self, lg: LoadGen, t: Target) -> None:
        a = self.a
        text = directive(tokens=a.events, pace_ms=a.pace_ms) + " stream bench"
        ideal = a.events * a.pace_ms / 1000
        log(f"{t.name}: {a.concurrency} streams x {a.events} events x {a.pace_ms} ms, {a.rounds} rounds")
        self.wait_quiet(f"{t.name} streams")
        profiler = self._start_profiler(t, "streams") if (a.profile and t.name in ("ours", "otel")) else None
        try:
            out = self._lg_run(lg, t, t.stream_spec(text), a.concurrency, a.rounds, ramp=ideal,
                               timeout=max(120.0, ideal * 20))
        finally:
            if profiler is not None:
                self._stop_profiler(profiler)
        recs = out["records"]
        ok = [r for r in recs if not r[6]]
        events = sum(r[4] for r in ok)
        cpu = out["cpu"]
        durations = [r[3] for r in ok]
        rss = t.server.memory_kb()["rss"] / 1024 if t.server else None
        t.results["stream"] = {
            "rss_mb": rss,
            "events": events, "expected": len(recs) * a.events, "streams": len(recs), "failed": len(recs) - len(ok),
            "short": sum(1 for r in ok if r[4] != a.events), "errors": out["errors"], "wall": out["wall"],
            "cpu": cpu, "us_per_event": cpu["server"] / events * 1e6 if events else None,
            "stretch_p50": pct(durations, 50) / ideal if durations else None,
            "stretch_p90": pct(durations, 90) / ideal if durations else None,
            "stretch_p99": pct(durations, 99) / ideal if durations else None,
            "fake_us_per_event": cpu["fake"] / events * 1e6 if events and cpu.get("fake") else None,
        }
        log(f"{t.name}: {events} events, server cpu {cpu['server']:.2f}s, errors {out['errors'] or 'none'}")

    # -- section 3: short turns ------------------------------------------------------------------
    def load_turns(self, lg: LoadGen, t: Target) -> None:
        a = self.a
        self.wait_quiet(f"{t.name} short turns")
        log(f"{t.name}: short turns, {a.turn_clients} clients x {a.turn_rounds} turns")
        profiler = self._start_profiler(t, "turns") if (a.profile and t.name in ("ours", "otel")) else None
        try:
            out = self._lg_run(lg, t, t.turn_spec(directive(tokens=5) + " short turn", a.session_turns),
                               a.turn_clients, a.turn_rounds)
        finally:
            if profiler is not None:
                self._stop_profiler(profiler)
        recs = out["records"]
        ok = [r for r in recs if not r[6]]
        lat = [r[3] for r in ok]
        cpu = out["cpu"]
        t.results["turn"] = {
            "rss_mb": t.server.memory_kb()["rss"] / 1024 if t.server else None,
            "turns": len(ok), "failed": len(recs) - len(ok), "errors": out["errors"], "wall": out["wall"],
            "cpu": cpu, "ms_per_turn": cpu["server"] / len(ok) * 1e3 if ok else None,
            "lat_p50": pct(lat, 50), "lat_p99": pct(lat, 99), "rate": len(ok) / out["wall"] if out["wall"] else None,
        }

    # -- section 11: every stream starts at once ---------------------------------------------------
    def load_burst(self, lg: LoadGen, t: Target) -> None:
        """`--concurrency` new streams (new sessions) sent at the same instant, one round: every turn
        start is paid before the last client sees a token (sections 1 and 2 ramp theirs in)."""
        a = self.a
        text = directive(tokens=a.events, pace_ms=a.pace_ms) + " burst bench"
        ideal = a.events * a.pace_ms / 1000
        self.wait_quiet(f"{t.name} burst")
        log(f"{t.name}: burst, {a.concurrency} streams at once x {a.events} events x {a.pace_ms} ms")
        profiler = self._start_profiler(t, "burst") if (a.profile and t.name in ("ours", "otel")) else None
        try:
            out = self._lg_run(lg, t, t.stream_spec(text), a.concurrency, 1, ramp=0.0, timeout=max(120.0, ideal * 20))
        finally:
            if profiler is not None:
                self._stop_profiler(profiler)
        ok = [r for r in out["records"] if not r[6] and r[2] is not None]
        ttft = [r[2] * 1000 for r in ok]
        durations = [r[3] for r in ok]
        t.results["burst"] = {"n": len(ok), "failed": len(out["records"]) - len(ok), "errors": out["errors"],
                              "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
                              "stretch_p50": pct(durations, 50) / ideal if durations else None}

    # -- section 4: time to first token -----------------------------------------------------------
    def load_ttft(self, lg: LoadGen, t: Target) -> None:
        a = self.a
        text = directive(tokens=a.ttft_events, pace_ms=a.pace_ms) + " ttft bench"
        self.wait_quiet(f"{t.name} TTFT")
        log(f"{t.name}: TTFT, {a.ttft_clients} concurrent x {a.ttft_rounds} rounds")
        out = self._lg_run(lg, t, t.stream_spec(text), a.ttft_clients, a.ttft_rounds,
                           ramp=a.ttft_events * a.pace_ms / 1000)
        ok = [r for r in out["records"] if not r[6] and r[2] is not None]
        ttft = [r[2] * 1000 for r in ok]
        t.results["ttft"] = {"rss_mb": t.server.memory_kb()["rss"] / 1024 if t.server else None, "n": len(ok), "errors": out["errors"], "p50": pct(ttft, 50), "p99": pct(ttft, 99)}

    # -- profiling (optional) ---------------------------------------------------------------------
    def _start_profiler(self, t: Target, what: str) -> subprocess.Popen[bytes] | None:
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(spy):
            log("--profile: py-spy is not installed in the venv (pip install py-spy); skipping")
            return None
        pid = t.cpu_pids[-1]  # the worker (or the single in-process server)
        RESULTS.mkdir(exist_ok=True)
        argv = [spy, "record", "--pid", str(pid), "--rate", "200", "--duration", "3600",
                "--format", "raw", "-o", str(RESULTS / f"profile-{t.name}-{what}.txt")]
        log(f"py-spy recording pid {pid} -> {RESULTS / f'profile-{t.name}-{what}.txt'} "
            f"(summary: python -m bench.profile_report <file>)")
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=procs._die_with_parent)

    @staticmethod
    def _stop_profiler(p: subprocess.Popen[bytes]) -> None:
        try:
            p.send_signal(signal.SIGINT)
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    # -- section 5: memory ------------------------------------------------------------------------
    def section_memory(self) -> None:
        a = self.a
        assert self.fake is not None and self.redis is not None
        n, warm = a.mem_count, 20
        hold = {"message": directive(tokens=3, pace_ms=600_000) + " hold", "cancel_on_disconnect": True}
        results: dict[str, Any] = {}
        cases = [
            ("ws", "idle WebSocket (connected, no turn)", {"kind": "ws", "path": "/agent/ws"}, None),
            ("sse_turn", "open SSE stream, each on its own live turn", {"kind": "sse_post", "path": "/agent/stream",
                                                                        "body": hold}, None),
            ("sse_resume", "open SSE resume stream (10 live turns)", {"kind": "sse_resume", "of_group": "prim"},
             {"kind": "sse_post", "path": "/agent/stream", "body": hold, "count": 10}),
        ]
        for key, label, spec, primary in cases:
            log(f"memory: {n} x {label}")
            server = Server("ours", self.fake, self.redis.url, workers=a.workers, tag=f"-mem-{key}")
            lg = LoadGen(f"-mem-{key}")
            try:
                base = {"host": "127.0.0.1", "port": server.port, "timeout": 60}
                if primary is not None:
                    r = lg.call({"cmd": "open", "group": "prim", **base, **primary})
                    if r["errors"]:
                        log(f"memory {key}: primary errors {r['errors']}")
                # warm the same path, then release it, so lazy imports are not counted
                lg.call({"cmd": "open", "group": "warm", "count": warm, **base, **spec})
                lg.call({"cmd": "close", "group": "warm"})
                time.sleep(0.5 if a.quick else 1.0)
                before = server.memory_kb()
                opened = lg.call({"cmd": "open", "group": "main", "count": n, **base, **spec})
                time.sleep(0.8 if a.quick else 1.5)
                after = server.memory_kb()
                lg.call({"cmd": "close", "group": "main"})
                got = opened["open"]
                results[key] = {
                    "label": label, "open": got, "errors": opened["errors"], "secs": opened["secs"],
                    "rss_kb": (after["rss"] - before["rss"]) / got if got else None,
                    "pss_kb": (after["pss"] - before["pss"]) / got if got else None,
                    "base_rss_mb": before["rss"] / 1024,
                }
                if opened["errors"]:
                    log(f"memory {key}: errors {opened['errors']}")
            finally:
                lg.stop()
                self.stop_server(f"memory {key}", server)
        self.memory = results

    # -- section 6: Redis per turn ----------------------------------------------------------------
    def section_redis(self) -> None:
        assert self.fake is not None and self.redis is not None
        if not self.redis.private:
            self.notes.append("section 6 used an external Redis: commandstats may include other clients")
        proxy = RedisProxy(self.redis.port).start()
        server = Server("ours", self.fake, f"redis://127.0.0.1:{proxy.port}/0", workers=1, tag="-redis")
        short = directive(tokens=5) + " redis bench"
        rows: list[dict[str, Any]] = []
        try:
            url = server.url
            http_json(url + "/agent", {"message": short})  # warm: script loading, pools
            http_stream(url + "/agent/stream", {"message": directive(tokens=5, pace_ms=5)})

            def measure(fn: Any) -> dict[str, Any]:
                time.sleep(0.25)
                p0, c0 = proxy.snapshot(), self.redis.commandstats()
                fn()
                time.sleep(0.25)
                p1, c1 = proxy.snapshot(), self.redis.commandstats()
                deltas = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
                deltas.pop("info", None)  # our own INFO snapshots (sent directly, not via the proxy)
                deltas = {k: v for k, v in deltas.items() if v}
                sent = {k: v - p0["commands"].get(k, 0) for k, v in p1["commands"].items()}
                sent = {k: v for k, v in sent.items() if v}
                return {"trips": p1["trips"] - p0["trips"], "up": p1["bytes_up"] - p0["bytes_up"],
                        "down": p1["bytes_down"] - p0["bytes_down"], "cmds": deltas, "sent": sent,
                        "all_cmds": sum(deltas.values()), "processed": sum(sent.values())}

            for h in (1, 10, 50):
                log(f"redis: turn on a session with {h} turns of history")
                sid = http_json(url + "/agent", {"message": short})["session_id"]
                for _ in range(h - 1):
                    http_json(url + "/agent", {"message": short, "session_id": sid})
                m = measure(lambda: http_json(url + "/agent", {"message": short, "session_id": sid}))
                m["label"] = f"POST /agent, 5 tokens, history {h} turn{'s' if h > 1 else ''}"
                m["h"] = h
                rows.append(m)
            ev, pace = self.a.events, self.a.pace_ms
            m = measure(lambda: http_stream(url + "/agent/stream",
                                            {"message": directive(tokens=ev, pace_ms=pace) + " redis stream"}))
            m["label"] = f"POST /agent/stream, {ev} events x {pace} ms, new session"
            m["h"] = 0
            rows.append(m)
        finally:
            self.stop_server("redis", server)
            proxy.stop()
        self.redis_rows = rows

    # -- section 8: Redis sizing (bench/sizing.py) -------------------------------------------------
    def section_sizing(self) -> None:
        """What one Redis node carries: its own private redis-server, whatever --redis-url says."""
        self.sizing = sizing.run(self)

    # -- section 9: the tool loop, and one MCP call ------------------------------------------------
    def section_tools(self) -> None:
        """Turns that call one tool (2 model calls each): the calculator (a local tool), then, where
        the tree has MCP support, the `echo` tool of tests/mcp_server.py over stdio (its process is
        the server's child, so its CPU is counted)."""
        assert self.fake is not None and self.redis is not None
        a = self.a
        variants = [("local", {}, "calculator", {"expression": "2+2"})]
        if os.path.exists(os.path.join(ROOT, "server", "tools", "mcp.py")):
            config = {"mcpServers": {"bench": {"command": sys.executable, "args": [MCP_TEST_SERVER]}}}
            variants.append(("mcp stdio", {"MCP_SERVERS": json.dumps(config)}, "bench__echo", {"text": "hi"}))
        self.tool_rows = []
        for label, env, tool, tool_input in variants:
            server = Server("ours", self.fake, self.redis.url, workers=1, extra_env=env, tag="-tools")
            t = Target("ours", "127.0.0.1", server.port, server.pids(), server)
            lg = LoadGen("-tools")
            text = directive(tool_use=[{"name": tool, "input": tool_input}]) + " tool turn"
            try:
                self._lg_run(lg, t, t.turn_spec(text, a.session_turns), 10, 2)  # warm-up
                t.cpu_pids = server.pids()
                self.wait_quiet(f"tool loop ({label})")
                log(f"tools: {label}, {a.turn_clients} clients x {a.turn_rounds} turns")
                out = self._lg_run(lg, t, t.turn_spec(text, a.session_turns), a.turn_clients, a.turn_rounds)
            finally:
                lg.stop()
                self.stop_server(f"tools {label}", server)
            ok = [r for r in out["records"] if not r[6]]
            lat = [r[3] for r in ok]
            self.tool_rows.append({"label": label, "tool": tool, "turns": len(ok), "failed": len(out["records"]) - len(ok),
                                   "errors": out["errors"], "cpu": out["cpu"]["server"],
                                   "ms_per_call": out["cpu"]["server"] / (2 * len(ok)) * 1e3 if ok else None,
                                   "lat_p50": pct(lat, 50) * 1e3 if lat else None,
                                   "lat_p99": pct(lat, 99) * 1e3 if lat else None})

    def section_start(self, starts: int = 5) -> None:
        """Process start to `/ready` answering 200: `python -m server`, one worker, Redis on, a real key's
        configuration (the offline model off: the fake is the upstream), started `starts` times in a row;
        and the server's CPU by then (imports and startup)."""
        assert self.fake is not None and self.redis is not None
        self.start_rows = []
        for _ in range(starts):
            began = time.monotonic()
            server = Server("ours", self.fake, self.redis.url, workers=1, tag="-start")
            ready = time.monotonic() - began
            cpu = sum(proc_cpu(pid) for pid in server.pids())
            self.stop_server("start", server)
            self.start_rows.append((ready, cpu))

    # -- report ---------------------------------------------------------------------------------
    def render(self, elapsed: float) -> str:
        a = self.a
        out: list[str] = []
        T = self.targets
        get = lambda name, sec, key: T[name].results.get(sec, {}).get(key) if name in T else None  # noqa: E731
        title = (f"agent server benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
                 f"{'QUICK' if a.quick else 'FULL'} run, {elapsed:.0f} s")
        out += [title, "=" * len(title)]
        out.append(f"box: {os.cpu_count()} cores, Python {platform.python_version()}; server: python -m server, "
                   f"{a.workers} worker{'s' if a.workers > 1 else ''} (uvloop, httptools), Redis sessions + event "
                   f"log on (flush 50 ms)")
        out.append(f"tree: {git_describe()}; server env: defaults + MAX_CONCURRENT_UPSTREAM={procs.UPSTREAM_CAP}, "
                   f"ANTHROPIC_MAX_RETRIES=0, LOG_LEVEL=INFO (access log on)")
        out.append(f"load: {a.concurrency} concurrent SSE streams x {a.events} events x {a.pace_ms} ms "
                   f"({a.rounds} per client, ramped over one stream); short turns: {a.turn_clients} clients x "
                   f"{a.turn_rounds} turns (5 tokens, sessions of {a.session_turns} turns); TTFT: {a.ttft_clients} "
                   f"concurrent x {a.ttft_rounds} ({a.ttft_events}-event streams)")
        out.append("ours = python -m server; seed = bench/seed_app.py (SDK messages.stream(), dict history, no "
                   "Redis); floor = the fake upstream read directly"
                   + ("; aiohttp = ours with the SDK's DefaultAioHttpClient instead of our upstream transport"
                      if "aiohttp" in T else "")
                   + ("; otel = ours with tracing on (OTEL_TRACES_SAMPLER=always_on: 100% sampling, OTLP/HTTP "
                      "protobuf to a sink in the bench process, the SDK's batch defaults)" if "otel" in T else ""))
        out.append("")
        hdr = f"{'#':<2} {'metric':<40} {'ours':>10} {'seed':>10} {'floor':>10} {'ours/seed':>9} {'ours/floor':>10}  target"
        out += [hdr, "-" * len(hdr)]

        def row(num: str, metric: str, vals: list[str], rs: list[str], target: str) -> None:
            out.append(f"{num:<2} {metric:<40} {vals[0]:>10} {vals[1]:>10} {vals[2]:>10} {rs[0]:>9} {rs[1]:>10}  {target}")

        if any("stream" in t.results for t in T.values()):
            v = [get(n, "stream", "us_per_event") for n in ("ours", "seed", "floor")]
            row("1", "server CPU per streamed event", [fmt(x, " µs") for x in v],
                [ratio(v[0], v[1]), ratio(v[0], v[2])], "≤45 µs")
            for key, lab, target in (("stretch_p50", "completion stretch, median", "≤1.15x"),
                                     ("stretch_p90", "completion stretch, p90", ""),
                                     ("stretch_p99", "completion stretch, p99", "")):
                v = [get(n, "stream", key) for n in ("ours", "seed", "floor")]
                row("2", lab, [fmt(x, "x", 2) for x in v], [ratio(v[0], v[1]), ratio(v[0], v[2])], target)
        if any("turn" in t.results for t in T.values()):
            v = [get(n, "turn", "ms_per_turn") for n in ("ours", "seed", "floor")]
            row("3", "server CPU per short turn", [fmt(x, " ms", 2) for x in v],
                [ratio(v[0], v[1]), ratio(v[0], v[2])], "≤1.5 ms")
            v = [get(n, "turn", "lat_p50") for n in ("ours", "seed", "floor")]
            v = [x * 1000 if x is not None else None for x in v]
            row("3", "short turn latency, p50", [fmt(x, " ms") for x in v], [ratio(v[0], v[1]), ratio(v[0], v[2])], "")
            v = [get(n, "turn", "lat_p99") for n in ("ours", "seed", "floor")]
            v = [x * 1000 if x is not None else None for x in v]
            row("3", "short turn latency, p99", [fmt(x, " ms") for x in v], [ratio(v[0], v[1]), ratio(v[0], v[2])], "")
        if any("ttft" in t.results for t in T.values()):
            for p in ("p50", "p99"):
                raw = [get(n, "ttft", p) for n in ("ours", "seed", "floor")]
                base = raw[2]
                vals = [f"{x - base:+.2f} ms" if x is not None and base is not None else "—" for x in raw[:2]]
                vals.append(f"({base:.1f} ms)" if base is not None else "—")
                row("4", f"TTFT added over direct, {p}", vals, [ratio(raw[0], raw[1]), ratio(raw[0], raw[2])],
                    "(floor column: raw TTFT; ratios of raw TTFT)")
        if any("burst" in t.results for t in T.values()):
            for key, lab, unit, digits, target in (
                    ("ttft_p50", "burst: TTFT p50", " ms", 1, "≤ floor + 100 ms"),
                    ("ttft_p99", "burst: TTFT p99", " ms", 1, ""),
                    ("stretch_p50", "burst: completion stretch, median", "x", 2, "≤ floor + 0.05")):
                v = [get(n, "burst", key) for n in ("ours", "seed", "floor")]
                row("11", lab, [fmt(x, unit, digits) for x in v], [ratio(v[0], v[1]), ratio(v[0], v[2])], target)
        if "aiohttp" in T:  # the upstream HTTP client weighed: ours vs the SDK's aiohttp one
            for sec, key, lab, unit, digits in (("stream", "us_per_event", "server CPU per event", " µs", 1),
                                                ("turn", "ms_per_turn", "server CPU per short turn", " ms", 2)):
                v = [get("ours", sec, key), get("aiohttp", sec, key)]
                if v[1] is not None:
                    row("1" if sec == "stream" else "3", f"{lab}, SDK aiohttp",
                        [fmt(v[1], unit, digits), "—", "—"], [ratio(v[1], v[0]) + " ours", ""],
                        "switch if within 1.15x of ours")
        if "otel" in T:  # the cost of tracing at 100% sampling: otel vs ours, same run
            for sec, key, lab, unit, digits, scale in (
                    ("stream", "us_per_event", "server CPU per event", " µs", 1, 1),
                    ("stream", "stretch_p50", "completion stretch, median", "x", 2, 1),
                    ("turn", "ms_per_turn", "server CPU per short turn", " ms", 2, 1),
                    ("turn", "lat_p50", "short turn latency, p50", " ms", 1, 1000),
                    ("ttft", "p50", "TTFT p50 (raw)", " ms", 2, 1)):
                v = [get("ours", sec, key), get("otel", sec, key)]
                v = [x * scale if x is not None else None for x in v]
                if v[1] is not None:
                    row({"stream": "1", "turn": "3", "ttft": "4"}[sec], f"{lab}, tracing on",
                        [fmt(v[1], unit, digits), "—", "—"], [ratio(v[1], v[0]) + " ours", ""],
                        "cost of tracing (100% sampled)")
        mem = getattr(self, "memory", None)
        if mem:
            # The target is per connection (an idle WebSocket, an open SSE stream); the last row
            # is a stream plus the running turn it started (its task and upstream connection).
            for key, lab, target in (("ws", "memory per idle WebSocket", "≤30 KB"),
                                     ("sse_resume", "memory per open SSE (resume follower)", "≤30 KB"),
                                     ("sse_turn", "memory per SSE + its own live turn", "(no target)")):
                if key in mem:
                    m = mem[key]
                    row("5", lab, [fmt(m["rss_kb"], " KB"), "—", "—"], ["", ""],
                        f"{target}   (Pss {fmt(m['pss_kb'], ' KB')}, n={m['open']})")
        rr = getattr(self, "redis_rows", None)
        if rr:
            trips = [r for r in rr if r["h"]]
            row("6", "Redis round trips per turn, h=1/10/50", ["/".join(str(r["trips"]) for r in trips), "—", "—"],
                ["", ""], "≤4, flat in history length")
            row("6", "Redis commands sent per turn", ["/".join(str(r["processed"]) for r in trips), "—", "—"],
                ["", ""], "")
            row("6", "Redis commands incl. inside Lua", ["/".join(str(r["all_cmds"]) for r in trips), "—", "—"],
                ["", ""], "")
        sz = getattr(self, "sizing", None)
        if sz:
            for metric, value, carries in sizing.summary(sz):
                row("8", metric, [value, "—", "—"], ["", ""], carries)
        out.append("")

        # details
        for name in ("ours", "otel", "aiohttp", "seed", "floor"):
            s = T[name].results.get("stream") if name in T else None
            if s:
                c = s["cpu"]
                other = c["box_busy"] - sum(c.get(k, 0) for k in ("server", "fake", "redis", "loadgen"))
                cores = c["box_total"] / s["wall"] if s["wall"] else 0
                out.append(f"[1/2 {name:7}] {s['streams']} streams, {s['events']} text events of {s['expected']} "
                           f"expected, {s['failed']} failed, {s['short']} short; {s['wall']:.1f} s wall; CPU s: "
                           f"server {c['server']:.2f} (kernel {c.get('server_kernel', 0):.2f}), fake {c.get('fake', 0):.2f}, "
                           f"redis {c.get('redis', 0):.2f}, loadgen {c['loadgen']:.2f}, other {max(other, 0):.2f} "
                           f"(box {c['box_busy'] / s['wall'] * 100 / max(cores, 1):.0f}% busy)"
                           + (f"; server RSS after {s['rss_mb']:.0f} MB" if s["rss_mb"] else ""))
                if s["errors"]:
                    out.append(f"             errors: {s['errors']}")
        for name in ("ours", "otel", "aiohttp", "seed", "floor"):
            s = T[name].results.get("turn") if name in T else None
            if s:
                c = s["cpu"]
                out.append(f"[3   {name:7}] {s['turns']} turns, {s['failed']} failed, {s['rate']:.0f} turns/s; CPU s: "
                           f"server {c['server']:.2f}, fake {c.get('fake', 0):.2f}, redis {c.get('redis', 0):.2f}, "
                           f"loadgen {c['loadgen']:.2f}" + (f"; server RSS after {s['rss_mb']:.0f} MB" if s["rss_mb"] else ""))
                if s["errors"]:
                    out.append(f"             errors: {s['errors']}")
        for name in ("ours", "otel", "seed", "floor"):
            s = T[name].results.get("ttft") if name in T else None
            if s:
                out.append(f"[4   {name:5}] {s['n']} streams; raw TTFT p50 {fmt(s['p50'], ' ms', 2)}, "
                           f"p99 {fmt(s['p99'], ' ms', 2)}" + (f"; errors {s['errors']}" if s["errors"] else "")
                           + (f"; server RSS after {s['rss_mb']:.0f} MB" if s["rss_mb"] else ""))
        sink = T["otel"].results.get("sink") if "otel" in T else None
        if sink:
            served = 60 + sum(T["otel"].results.get(sec, {}).get(k) or 0  # 60: the warm-up requests
                              for sec, k in (("stream", "streams"), ("turn", "turns"), ("turn", "failed"),
                                             ("ttft", "n")))
            out.append(f"[otel sink] {sink['spans']} spans in {sink['requests']} OTLP export requests "
                       f"({sink['bytes'] / 1e6:.1f} MB on the wire, {sink['errors']} refused) for ~{served} "
                       f"requests served: {sink['spans'] / max(served, 1):.1f} spans and "
                       f"{sink['bytes'] / max(sink['spans'], 1):.0f} B per span")
        if mem:
            for key, m in mem.items():
                out.append(f"[5 {key:10}] {m['open']} open in {m['secs']:.1f} s, server RSS before "
                           f"{m['base_rss_mb']:.0f} MB; per item RSS {fmt(m['rss_kb'], ' KB')}, Pss "
                           f"{fmt(m['pss_kb'], ' KB')}" + (f"; errors {m['errors']}" if m["errors"] else ""))
        if rr:
            out.append("[6] Redis per turn (private redis-server; round trips counted by a TCP proxy in front of it):")
            out.append(f"    {'turn':<52} {'trips':>5} {'sent':>5} {'all':>5} {'up B':>7} {'down B':>7}  "
                       f"sent by the server | all incl. Lua (commandstats)")
            order = lambda d: sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))  # noqa: E731
            for r in rr:
                sent = " ".join(f"{k}={v}" for k, v in order(r["sent"]))
                cmds = " ".join(f"{k}={v}" for k, v in order(r["cmds"]))
                out.append(f"    {r['label']:<52} {r['trips']:>5} {r['processed']:>5} {r['all_cmds']:>5} "
                           f"{r['up']:>7} {r['down']:>7}  {sent} | {cmds}")
        if sz:
            out += sizing.render(sz, a.pace_ms)
        for r in getattr(self, "tool_rows", []):
            out.append(f"[9 {r['label']:9}] {r['turns']} turns calling {r['tool']} (2 model calls each), {r['failed']} "
                       f"failed; server CPU {fmt(r['ms_per_call'], ' ms', 3)} per model call; turn latency p50 "
                       f"{fmt(r['lat_p50'], ' ms', 1)}, p99 {fmt(r['lat_p99'], ' ms', 1)}"
                       + (f"; errors {r['errors']}" if r["errors"] else ""))
        rows9 = getattr(self, "tool_rows", [])
        if len(rows9) == 2 and rows9[0]["ms_per_call"] and rows9[1]["ms_per_call"]:
            extra = 2 * (rows9[1]["ms_per_call"] - rows9[0]["ms_per_call"])  # (per turn: one tool call)
            out.append(f"[9 overhead ] one MCP call (stdio) instead of a local tool: {extra:+.3f} ms of server CPU "
                       f"(MCP server process included), {rows9[1]['lat_p50'] - rows9[0]['lat_p50']:+.1f} ms turn "
                       f"latency p50")
        starts = getattr(self, "start_rows", [])
        if starts:
            ready, cpu = sorted(r for r, _ in starts), sorted(c for _, c in starts)
            out.append(f"[10 start   ] process start to /ready 200, {len(starts)} starts: median {pct(ready, 50):.2f} s "
                       f"(min {ready[0]:.2f}, max {ready[-1]:.2f}); server CPU by then median {pct(cpu, 50):.2f} s "
                       f"(polled every 20 ms; target ≤ 1.0 s)")
        for label, _sigterms, problems in self.server_logs:
            if problems:
                shown = "; ".join(f"{n} x {k}" for n, k in problems[:4])
                more = f"; +{len(problems) - 4} more kinds" if len(problems) > 4 else ""
                out.append(f"[server log, {label}] {shown}{more}")
        for w in self.quiet_waits:
            out.append(f"[shared box] {w}")
        out.append("")
        out.append("How to read it:")
        out.append(" 1  server CPU = utime+stime of the server process(es) (/proc/<pid>/stat) over the load window /")
        out.append("    text events delivered; includes turn start/commit, upstream parsing and Redis I/O. floor = the")
        out.append("    fake's own CPU per event (hand-written asyncio server writing pre-encoded chunks). A saturated")
        out.append("    server batches several events per read/write, so its CPU per event FALLS as stretch rises:")
        out.append("    read rows 1 and 2 together (try --concurrency 40 for the unsaturated cost).")
        out.append(" 2  stretch = stream duration (request sent -> last byte) / (events x pace); fake, server and load")
        out.append("    generator share the 2 cores, so contention shows up here (see 'box % busy').")
        out.append(" 3  short turn = POST /agent with a 5-token answer (seed: messages.create; floor: the fake's")
        out.append("    non-streaming /v1/messages), incl. session load + commit in Redis for ours.")
        out.append(" 4  TTFT = request sent -> first text event; 'added' = target percentile - direct percentile.")
        out.append(" 5  RSS delta of the server process(es) / count, after a 20-item warm-up that is released first.")
        out.append("    The idle WebSockets are connected and silent; 'resume follower': GET /sessions/{id}/stream")
        out.append("    on 10 live turns = the per-stream transport cost alone (the target's 'open SSE stream', as")
        out.append("    the idle WebSocket has no turn either); '+ its own live turn': each stream is a POST")
        out.append("    /agent/stream whose turn stays open (the fake waits 600 s between tokens), so it adds a")
        out.append("    running conversation: the turn task, its upstream HTTP connection, its Redis lock renewal.")
        out.append(" 6  trips = server->Redis round trips (a pipeline or an EVALSHA is one), counted by a TCP proxy;")
        out.append("    sent = commands on the wire; all = INFO commandstats delta, incl. commands run inside Lua.")
        out.append(" 8  a fresh private redis-server; Redis CPU (INFO used_cpu_sys+user, minus its idle rate) per short")
        out.append("    turn and per stream-second of streams held open at the bench's pace; 'per Redis core' = 1 /")
        out.append("    that (Redis runs commands on one thread: plan for ~50% of it). Memory: used_memory per session")
        out.append("    (keys after the turns' event logs are deleted; those expire EVENT_LOG_TTL_SECONDS after a turn)")
        out.append("    and its growth per stream-minute while the streams run (MEMORY USAGE per event as a check).")
        out.append(" 9  POST /agent turns whose first model call asks for one tool (the fake's `tool_use` directive) and")
        out.append("    whose second answers; server CPU (worker + children: the MCP server over stdio) / model calls.")
        for n in self.notes:
            out.append(f" !  {n}")
        return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller numbers, under a minute")
    p.add_argument("--concurrency", type=int, help="concurrent SSE streams (default 400; quick 100)")
    p.add_argument("--events", type=int, help="text events per stream (default 100; quick 50)")
    p.add_argument("--pace-ms", type=float, default=20.0, help="ms between events (default 20)")
    p.add_argument("--rounds", type=int, help="streams per client in sections 1/2 (default 2; quick 1)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers (WEB_CONCURRENCY) for ours and seed")
    p.add_argument("--only", default="",
                   help="sections, e.g. 1,3 or stream,memory (1-10; 7 = seed/floor columns, 8 = Redis sizing, "
                        "9 = tool loop, 10 = start to /ready, 11 = every stream at once)")
    p.add_argument("--targets", default=None,
                   help="columns for sections 1-4: ours,otel,aiohttp,seed,floor (default: ours,seed,floor when "
                        "section 7 runs, else ours); aiohttp = ours on the SDK's DefaultAioHttpClient; otel = "
                        "ours with tracing on (see --tracing)")
    p.add_argument("--tracing", action="store_true",
                   help="also run 'otel' in sections 1-4: ours with OpenTelemetry tracing at 100%% sampling, "
                        "exporting OTLP/HTTP to a sink in the bench process (same as adding otel to --targets)")
    p.add_argument("--mem-count", type=int, help="WebSockets / SSE streams held open (default 1000; quick 200)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of a private redis-server")
    p.add_argument("--profile", action="store_true",
                   help="py-spy record our worker during sections 1, 3 and 11 (bench-results/profile-ours-*.txt, and "
                        "profile-otel-*.txt with --tracing; "
                        "the profiled run's CPU figures include py-spy's pauses)")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="before each load, wait up to this many s for the (shared) box to be idle (default 30; quick 3)")
    p.add_argument("--quiet-level", type=float, default=0.25, help="'idle' = at most this fraction of the box busy")
    p.add_argument("--out", default=str(RESULTS / "latest.txt"))
    a = p.parse_args(argv)
    q = a.quick
    a.concurrency = a.concurrency or (100 if q else 400)
    a.events = a.events or (50 if q else 100)
    a.rounds = a.rounds or (1 if q else 2)
    if a.quiet_wait is None:
        a.quiet_wait = 3.0 if q else 30.0
    a.mem_count = a.mem_count or (200 if q else 1000)
    a.turn_clients = 50
    a.turn_rounds = 10 if q else 40
    a.session_turns = 10
    a.ttft_clients = 10
    a.ttft_rounds = 8 if q else 25
    a.ttft_events = 20
    if a.pace_ms == int(a.pace_ms):
        a.pace_ms = int(a.pace_ms)
    chosen: set[str] = set()
    for item in filter(None, (x.strip().lower() for x in a.only.split(","))):
        num = next((k for k, v in SECTION_NAMES.items() if v == item), item)
        if num not in SECTION_NAMES:
            p.error(f"--only: unknown section {item!r} (1-10 or {', '.join(SECTION_NAMES.values())})")
        chosen.add(num)
    a.sections = chosen or set(SECTION_NAMES)
    if a.sections == {"7"}:
        a.sections = {"1", "2", "3", "4", "7"}
    if a.targets:
        targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    else:
        targets = ["ours", "seed", "floor"] if "7" in a.sections else ["ours"]
    if a.tracing and "otel" not in targets:
        targets += ["ours", "otel"]  # (the cost is read against ours, in the same run)
    if "4" in a.sections and "floor" not in targets:
        targets.append("floor")  # the TTFT baseline
    a.targets = [t for t in ("ours", "otel", "aiohttp", "seed", "floor") if t in targets]
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        report = Bench(args).run()
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        procs.stop_all()
    print(report, end="")
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    paths = [out]
    if out == str(RESULTS / "latest.txt") and not args.only:  # also keep the last run of each kind
        traced = "-tracing" if "otel" in args.targets else ""  # (a traced run keeps its own file)
        paths.append(str(RESULTS / f"latest-{'quick' if args.quick else 'full'}{traced}.txt"))
    for path in paths:
        with open(path, "w") as f:
            f.write(report)
    log(f"written to {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
