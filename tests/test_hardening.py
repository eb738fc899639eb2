"""Hardening (#14): what an attacker or a bad day finds. Another principal's `message_id`
reveals nothing, a crashed worker's turn always ends for whoever resumes it, and a Redis
outage is a retryable 503 that heals by itself. Real servers, real Redis, real SIGKILLs."""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis
import websockets

from .harness import eventually, free_port
from .test_security import auth, new_key, ws_status


def chat_id() -> str:
    return secrets.token_urlsafe(16).replace("-", "x")


def _chat_text(body: str) -> str:
    chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


def ui_user(text: str, message_id: str) -> dict:
    return {"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]}


# -- 1. another principal's message_id --------------------------------------------------------
@pytest.fixture
def two_keys(start_server):
    k1, k2 = new_key(), new_key()
    server = start_server(AGENT_API_KEYS=f"{k1},{k2}", RATE_LIMIT_RPM=0, RATE_LIMIT_TPM=0,
                          MAX_CONCURRENT_STREAMS_PER_PRINCIPAL=0)
    return server, k1, k2


async def test_message_id_of_another_principal_answers_as_no_session(two_keys, upstream, redis_url):
    server, k1, k2 = two_keys
    upstream.script({"text": "K1's private answer"}, {"text": "K1's running answer", "ttft_ms": 2000})
    missing = "Q" * 22
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        first = (await client.post("/agent", headers=auth(k1), json={"message": "secret", "message_id": "m-1"})).json()
        sid = first["session_id"]
        running = asyncio.create_task(client.post("/agent", headers=auth(k1), json={
            "message": "more", "session_id": sid, "message_id": "m-2"}))
        await eventually(lambda: len(upstream.requests()) == 2, timeout=10)

        for mid in ("m-1", "m-2", "never-sent"):  # a finished turn, a running one, no turn at all
            for target in (sid, missing):
                body = {"message": "let me in", "session_id": target, "message_id": mid}
                r = await client.post("/agent", headers=auth(k2), json=body)
                assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found", (mid, r.text)
                s = await client.post("/agent/stream", headers=auth(k2), json=body)
                assert s.status_code == 404 and s.json() == r.json(), "the same answer as for no session"
        async with websockets.connect(f"{server.ws_url}/agent/ws", additional_headers=auth(k2)) as ws:
            for mid in ("m-1", "m-2"):
                await ws.send(json.dumps({"type": "message", "message": "join", "session_id": sid, "message_id": mid}))
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert frame["type"] == "error" and frame["code"] == "session_not_found", frame
            # The socket was not bound to K1's session: K2 can still start its own.
            upstream.script({"text": "K2's own"})
            await ws.send(json.dumps({"type": "message", "message": "mine"}))
            while (frame := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] not in ("turn_end", "error"):
                pass
            assert frame["type"] == "turn_end" and frame["text"] == "K2's own" and frame["session_id"] != sid

        done = (await running).json()
        assert done["text"] == "K1's running answer"

        # The AI SDK transports: a chat id that is a session id, with K1's UI message id.
        cid = chat_id()
        upstream.script({"text": "K1's chat answer"})
        r = await client.post("/api/chat", headers=auth(k1), json={
            "id": cid, "trigger": "submit-message", "messages": [ui_user("chat secret", "u-1")]})
        assert r.status_code == 200 and _chat_text(r.text) == "K1's chat answer"
        r2 = await client.post("/api/chat", headers=auth(k2), json={
            "id": cid, "trigger": "submit-message", "messages": [ui_user("join", "u-1")]})
        assert r2.status_code == 404 and "chat" not in r2.text
        async with websockets.connect(f"{server.ws_url}/api/chat/ws", additional_headers=auth(k2)) as ws:
            await ws.send(json.dumps({"type": "send", "requestId": "r1", "id": cid, "trigger": "submit-message",
                                      "messages": [ui_user("join", "u-1")], "headers": {}, "body": {}}))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert frame["type"] == "error" and frame["requestId"] == "r1", frame

        # K1 deletes the session: its message ids go with it, and a replay is a new turn.
        assert (await client.delete(f"/sessions/{sid}", headers=auth(k1))).status_code == 204
        store = redis.Redis.from_url(redis_url)
        assert store.keys(f"agent:{{{sid}}}:*") == [], "nothing of the session is left"
        r = await client.post("/agent", headers=auth(k1), json={"message": "again", "session_id": sid,
                                                                  "message_id": "m-1"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        assert store.keys(f"agent:{{{sid}}}:*") == [], "the replay re-created no key"
    assert len(upstream.requests()) == 4, "nothing K2 sent reached the model but its own message"


async def test_delete_cancels_the_running_turn(start_server, upstream):
    server = start_server()
    upstream.script({"tokens": 300, "pace_ms": 20})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        async with client.stream("POST", "/agent/stream", json={"message": "long"}) as r:
            sid = r.headers["x-session-id"]
            assert (await client.delete(f"/sessions/{sid}")).status_code == 204
            body = (await asyncio.wait_for(r.aread(), 10)).decode()
        events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] in ("turn_end", "error") and len(events) < 300
        assert (await client.get(f"/sessions/{sid}")).status_code == 404


# -- 3. a crashed worker's turn always ends -----------------------------------------------------
def _pid_serving(pids: list[int], local_port: int) -> int | None:
    """The worker process holding the server end of our connection from `local_port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == local_port:
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def _events(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


CRASH_KILLS = int(os.environ.get("CRASH_KILLS", "50"))


async def test_every_resume_after_a_crash_ends_and_no_event_id_names_two_events(start_server, upstream):
    """SIGKILL the worker running a turn at a random point, CRASH_KILLS times (on two servers
    at once, half each); every client resumes from the last event it saw and must get a
    terminal event; an id never names two different events; the history never holds half a
    turn, and the session takes a new turn afterwards."""
    outcomes = {"killed": 0, "interrupted": 0, "completed": 0, "no_terminal": 0, "id_reused": 0}
    rng = random.Random(int(os.environ.get("CRASH_SEED", "14")))
    servers = [start_server(workers=2, module="tests.forking_server", name=f"crash-{i}",
                            TURN_LOCK_TTL_SECONDS=1, EVENT_LOG_FLUSH_MS=50) for i in range(2)]
    # Every turn streams 80 tokens 15 ms apart (the fake's default script, not a queue that
    # two concurrent loops would take from each other's turns).
    answer = '#fake{"tokens": 80, "pace_ms": 15}'
    await asyncio.gather(*(_kill_rounds(server, CRASH_KILLS // 2 + i * (CRASH_KILLS % 2), answer, rng, outcomes)
                           for i, server in enumerate(servers)))
    print(f"\ncrash resume outcomes over {outcomes['killed']} SIGKILLs: {outcomes}")
    assert outcomes["killed"] >= CRASH_KILLS
    assert outcomes["no_terminal"] == 0 and outcomes["id_reused"] == 0, outcomes
    assert outcomes["interrupted"] >= CRASH_KILLS, outcomes


async def _kill_rounds(server, kills: int, answer: str, rng: random.Random, outcomes: dict[str, int]) -> None:
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
        for _ in range(kills):
            await eventually(lambda: len(server.worker_pids()) == 2, timeout=20)
            heads: dict[str, list[dict]] = {}

            async def run(n: int, kill_after: int | None) -> None:
                async with client.stream("POST", "/agent/stream", json={"message": f"{answer} {n}"}) as r:
                    assert r.status_code == 200
                    sid = r.headers["x-session-id"]
                    heads[sid] = []
                    port = r.extensions["network_stream"].get_extra_info("client_addr")[1]
                    try:
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                heads[sid].append(json.loads(line[6:]))
                                if kill_after is not None and len(heads[sid]) == kill_after:
                                    pid = _pid_serving(server.worker_pids(), port)
                                    assert pid is not None, "the worker serving the stream"
                                    os.kill(pid, signal.SIGKILL)
                    except (httpx.ReadError, httpx.RemoteProtocolError):
                        pass  # the worker died under us

            # Two turns at once; the first one's worker is killed after 3-60 events (the
            # second may share its worker or not).
            await asyncio.gather(run(0, rng.randint(3, 60)), run(1, None))
            outcomes["killed"] += 1
            for sid, head in heads.items():
                events = list(head)
                if not events or events[-1]["type"] not in ("turn_end", "error"):
                    last = events[-1]["id"] if events else ""
                    r = await client.get(f"/sessions/{sid}/stream", headers={"Last-Event-ID": last}, timeout=20)
                    events += _events(r.text) if r.status_code == 200 else []
                ids: dict[str, str] = {}
                for e in events:
                    if ids.setdefault(e["id"], json.dumps(e, sort_keys=True)) != json.dumps(e, sort_keys=True):
                        outcomes["id_reused"] += 1
                terminal = events[-1] if events and events[-1]["type"] in ("turn_end", "error") else None
                if terminal is None:
                    outcomes["no_terminal"] += 1
                elif terminal["type"] == "turn_end":
                    outcomes["completed"] += 1
                else:
                    assert terminal["code"] == "interrupted" and terminal["retryable"], terminal
                    outcomes["interrupted"] += 1
                # History: a completed turn committed its two messages, an interrupted one none.
                view = (await client.get(f"/sessions/{sid}")).json()
                roles = [m["role"] for m in view["messages"]]
                expected = ["user", "assistant"] if terminal and terminal["type"] == "turn_end" else []
                assert roles == expected, (sid, roles, terminal)
        # A crashed session takes a new turn (its dead worker's lock has expired by now).
        r = await client.post("/agent", json={"message": "again", "session_id": sid})
        assert r.status_code == 200 and r.json()["stop_reason"] == "end_turn", r.text


# -- 5. Redis outage ---------------------------------------------------------------------------
class PrivateRedis:
    """A redis-server of this test's own, to stop and start again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="agent-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PrivateRedis":
        binary = shutil.which("redis-server")
        assert binary, "redis-server (scripts/test installs it)"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def private_redis():
    r = PrivateRedis().start()
    yield r
    r.stop()
    shutil.rmtree(r.dir, ignore_errors=True)


async def test_redis_outage_is_a_retryable_503_and_heals(start_server, upstream, private_redis):
    key = new_key()
    server = start_server(redis=False, REDIS_URL=private_redis.url, AGENT_API_KEYS=key, RATE_LIMIT_RPM=1000,
                          EVENT_LOG_FLUSH_MS=50)
    log_start = len(Path(server.log_path).read_bytes())
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=auth(key)) as client:
        upstream.script({"text": "before"})
        sid = (await client.post("/agent", json={"message": "hi"})).json()["session_id"]
        ticket = (await client.post("/ws-ticket")).json()["ticket"]
        # A turn that runs through the outage: its log writes fail, quietly.
        upstream.script({"tokens": 150, "pace_ms": 20})
        running = asyncio.create_task(client.post("/agent", json={"message": "long", "session_id": sid}))
        await eventually(lambda: len(upstream.requests()) == 2, timeout=10)
        private_redis.stop()
        await asyncio.sleep(2.0)
        for method, path, body in [("POST", "/agent", {"message": "hi"}),
                                   ("POST", "/agent", {"message": "hi", "session_id": sid}),
                                   ("POST", "/agent/stream", {"message": "hi"}),
                                   ("GET", f"/sessions/{sid}", None), ("DELETE", f"/sessions/{sid}", None),
                                   ("GET", f"/sessions/{sid}/stream", None),
                                   ("POST", f"/sessions/{sid}/cancel", None)]:
            r = await client.request(method, path, json=body)
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == "store_unavailable" and error["retryable"] is True, r.text
        # A WebSocket ticket cannot be checked for single use: it fails closed, every time.
        for _ in range(3):
            status, body = await ws_status(f"{server.ws_url}/agent/ws?ticket={ticket}")
            assert status == 503 and body["error"]["code"] == "store_unavailable", (status, body)
        assert (await client.get("/ready")).status_code == 503
        done = await running  # the turn itself could not be committed: a retryable error
        assert done.status_code in (200, 503), done.text
        if done.status_code == 503:
            assert done.json()["error"]["retryable"] is True

        private_redis.start()  # empty: an outage that lost the data, the worst case
        upstream.script({"text": "after"})
        r = await client.post("/agent", json={"message": "hello again"})
        assert r.status_code == 200 and r.json()["text"] == "after", r.text
        new_sid = r.json()["session_id"]
        assert (await client.get(f"/sessions/{new_sid}")).status_code == 200
        assert (await client.get(f"/sessions/{sid}")).status_code == 404
        assert (await client.get("/ready")).status_code == 200
        r = await client.post("/ws-ticket")
        status, _ = await ws_status(f"{server.ws_url}/agent/ws?ticket={r.json()['ticket']}")
        assert status == 101
        # A restart between two requests: the pooled connections are stale, not broken yet.
        private_redis.stop()
        private_redis.start()
        for _ in range(3):
            r = await client.get(f"/sessions/{new_sid}")
            assert r.status_code == 404, r.text  # (the restart lost it; but no 500, no 503)
        upstream.script({"text": "still here"})
        r = await client.post("/agent", json={"message": "hello"})
        assert r.status_code == 200 and r.json()["text"] == "still here", r.text
    log = Path(server.log_path).read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    flush_warnings = [line for line in log.splitlines() if "event log" in line and '"warning"' in line]
    assert 1 <= len(flush_warnings) <= 3, flush_warnings


async def test_rate_limits_hold_under_a_burst(start_server, upstream):
    """400 requests at once against a limit of 60 per minute: the limiter waits for a Redis
    connection instead of failing open, so no more than the limit gets through."""
    key = new_key()
    server = start_server(AGENT_API_KEYS=key, RATE_LIMIT_RPM=60, RATE_LIMIT_TPM=0)
    limits = httpx.Limits(max_connections=400)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=auth(key), limits=limits) as client:
        missing = "M" * 22
        started = time.monotonic()
        statuses = await asyncio.gather(*(client.get(f"/sessions/{missing}") for _ in range(400)))
        elapsed = time.monotonic() - started
    counts = {s: sum(1 for r in statuses if r.status_code == s) for s in {r.status_code for r in statuses}}
    allowed = 60 + int(elapsed) + 1  # the burst, and one more per second that passed
    assert counts.get(404, 0) <= allowed and counts.get(404, 0) + counts.get(429, 0) == 400, (counts, elapsed)
    assert "rate limiter cannot reach Redis" not in server.log()
