"""Real processes for integration tests: the fake upstream and uvicorn servers.

Nothing here mocks the SDK or Redis: servers are `python -m server` subprocesses (uvicorn,
1 or more workers) talking to a fake Anthropic subprocess over real sockets and to the real
Redis on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from httpx_sse import aconnect_sse

ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = ROOT / "test-artifacts" / "logs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeUpstream:
    """The fake Anthropic API in its own process, scripted over its control endpoints."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.fake_anthropic", "--port", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if "listening on " not in line:
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        self.url = line.rsplit(" ", 1)[1]
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def script(self, *scripts: dict[str, Any]) -> None:
        self.http.post("/_fake/script", json=list(scripts)).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        return [r for r in self.http.get("/_fake/requests").json() if r["path"] == "/v1/messages"]

    def reset(self) -> None:
        self.http.post("/_fake/reset").raise_for_status()

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(10)


class Server:
    """`python -m server` with its own port; env overrides on top of the test defaults."""

    def __init__(self, env: dict[str, str], name: str = "server", module: str = "server"):
        self.env = env
        self.name = name
        self.module = module  # what `python -m` runs: the server, or a test launcher of it
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = LOG_DIR / f"{name}-{self.port}.log"

    def start(self, timeout: float = 60.0, wait: bool = True) -> "Server":
        """Start the process; with `wait`, return once /ready answers 200 (else call wait_ready:
        several servers then start side by side)."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], cwd=ROOT, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.wait_ready(timeout) if wait else self

    def wait_ready(self, timeout: float = 60.0) -> "Server":
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except FileNotFoundError:
            return ""

    def worker_pids(self) -> list[int]:
        """uvicorn worker processes (children of the supervisor), or the server itself."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        children = [int(p) for p in out.split()]
        return children or [self.proc.pid]

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        try:
            self.send_signal(sig)
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            return self.proc.wait(5)
        finally:
            self._log.close()


def server_env(fake: FakeUpstream, redis_url: str | None, **overrides: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "REDIS_", "AGENT_"))}
    env.update({
        "PORT": str(free_port()),
        "HOST": "127.0.0.1",
        "ANTHROPIC_API_KEY": "sk-ant-test-upstream-key-0123456789",
        "ANTHROPIC_BASE_URL": fake.url,
        "ANTHROPIC_MAX_RETRIES": "0",
        "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "INFO",
        "HEARTBEAT_SECONDS": "15",
        "PYTHONUNBUFFERED": "1",
    })
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update({k: str(v) for k, v in overrides.items()})
    return env


async def sse_turn(client: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST /agent/stream with an httpx client: the turn's events (the stream must answer 200)."""
    events = []
    async with aconnect_sse(client, "POST", "/agent/stream", json=body) as source:
        assert source.response.status_code == 200, await source.response.aread()
        async for s in source.aiter_sse():
            events.append(json.loads(s.data))
    return events


async def chat_and_leave(client: Any, url: str, chat_id: str, question: dict[str, Any], deltas: int = 3) -> str:
    """POST /api/chat (the AI SDK) with `question`, read `deltas` text deltas and hang up (the turn
    goes on); the turn's id."""
    body = {"id": chat_id, "trigger": "submit-message", "messages": [question]}
    async with client.stream("POST", url + "/api/chat", json=body) as r:
        assert r.status_code == 200
        seen = 0
        async for line in r.aiter_lines():
            seen += '"text-delta"' in line
            if seen == deltas:
                break
        return r.headers["x-turn-id"]


def sse_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll until predicate() is truthy (sync or async); return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


def strip_cache(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as the model saw them, less the prompt-cache breakpoints (copies)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{k: v for k, v in b.items() if k != "cache_control"} for b in content]
        out.append({**m, "content": content})
    return out


def history_texts(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(role, joined text) per API message: what the model was sent."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append((m["role"], content))
        else:
            out.append((m["role"], "".join(b.get("text", "") for b in content if b["type"] == "text")))
    return out


async def ws_turn(ws: Any, text: str, **fields: Any) -> list[dict[str, Any]]:
    """Send one message (with any other request `fields`) on an open /agent/ws socket; its events
    up to the terminal one."""
    await ws.send(json.dumps({"type": "message", "message": text, **fields}))
    events = []
    while True:
        event = json.loads(await ws.recv())
        if event["type"] in ("ping", "pong"):
            continue
        events.append(event)
        if event["type"] in ("turn_end", "error"):
            return events


def session_keys(redis_url: str) -> set[bytes]:
    """The sessions in Redis (their meta keys). Tests compare these sets, not counts: sessions
    left by earlier runs in a shared database expire at any moment."""
    client = redis.Redis.from_url(redis_url)
    try:
        return set(client.scan_iter(match="agent:{*}:meta", count=1000))
    finally:
        client.close()
