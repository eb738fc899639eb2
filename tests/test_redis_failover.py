"""Redis failing under load: a Redis Cluster master SIGKILLed (its replica takes over) and a
single Redis SIGKILLed and restarted, repeatedly, while clients talk to two app servers.

What must hold (the issue's "failover without lost turns"): the servers recover without a
restart; a turn caught by the failure either completes or ends with a retryable error (never a
500 or a non-retryable code); every answer a client received is in the history exactly once
(a client retries a failed message, so a turn that did commit but was reported as failed would
show up twice); the history alternates user/assistant. The outcome counts go to
test-artifacts/failover-<store>.json and the test's output.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx
import pytest
import redis

from .harness import LOG_DIR, ROOT, free_port
from .redis_cluster import RedisCluster

SESSIONS = 8
ROUNDS = 3


class Load:
    """Clients, one per session, each sending numbered messages one after another, alternating
    between the servers; a failed message is sent again (new message_id) until it succeeds."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.sent: dict[str, list[str]] = {}  # session id -> the messages it answered, in order
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(self._session(client, n) for n in range(SESSIONS)))

    async def _session(self, client: httpx.AsyncClient, n: int) -> None:
        sid: str | None = None
        answered: list[str] = []
        for i in itertools.count():
            if self.stop.is_set():
                break
            text = f"s{n}-m{i}"
            for attempt in itertools.count():
                body: dict[str, Any] = {"message": text, "message_id": f"{text}-{attempt}"}
                if sid:
                    body["session_id"] = sid
                r = await client.post(self.urls[(i + attempt) % len(self.urls)] + "/agent", json=body)
                if r.status_code == 200:
                    sid = r.json()["session_id"]
                    answered.append(text)
                    self.outcomes["completed"] += 1
                    break
                error = r.json()
                error = error.get("error", error)
                self.outcomes[f"{r.status_code} {error['code']}"] += 1
                assert error["retryable"] and r.status_code != 500, (r.status_code, error)
                if sid is None and i == 0 and attempt > 40:
                    raise AssertionError("a session could not be created for 40 attempts")
                await asyncio.sleep(0.1)
        if sid:
            self.sent[sid] = answered


async def run_with_failures(urls: list[str], fail: Callable[[int], Awaitable[None]]) -> Load:
    load = Load(urls)
    task = asyncio.create_task(load.run())
    try:
        for round_ in range(ROUNDS):
            await asyncio.sleep(1.0)
            await fail(round_)
        await asyncio.sleep(1.5)  # and turns go on after the last failure
    finally:
        load.stop.set()
    await asyncio.wait_for(task, 90)
    return load


async def check_histories(load: Load, url: str, name: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for sid, answered in load.sent.items():
            r = await client.get(f"{url}/sessions/{sid}")
            assert r.status_code == 200, r.text
            history = r.json()["messages"]
            assert [m["role"] for m in history] == ["user", "assistant"] * (len(history) // 2), "alternating"
            users = [m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
                     for m in history if m["role"] == "user"]
            assert users == answered, "every answered message once, in order; nothing else"
    total = sum(map(len, load.sent.values()))
    report = {"store": name, "rounds": ROUNDS, "sessions": SESSIONS, "answered_turns": total,
              "outcomes": dict(load.outcomes)}
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / f"failover-{name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    assert load.outcomes["completed"] == total and total >= SESSIONS * ROUNDS


@pytest.fixture
def replicated_cluster():
    with RedisCluster(masters=3, replicas_per_master=1, node_timeout_ms=1000).start() as cluster:
        yield cluster


def servers(start_server, upstream, **env: Any) -> list[Any]:
    upstream.script(*[{"tokens": 5, "pace_ms": 20}] * 2000)  # turns of ~0.1 s: some always running
    pair = [start_server(name=f"failover-{n}", wait=False, redis=False, **env) for n in "ab"]
    return [s.wait_ready() for s in pair]


async def test_cluster_master_killed_under_load(replicated_cluster, start_server, upstream):
    a, b = servers(start_server, upstream, REDIS_URL=replicated_cluster.url, REDIS_CLUSTER="true",
                   REDIS_WAIT_REPLICAS=1, TURN_LOCK_TTL_SECONDS=5)
    killed: list[Any] = []

    async def fail(round_: int) -> None:
        if killed:  # the last round's victim comes back, as a replica (one failure at a time)
            await asyncio.to_thread(killed.pop().restart)
            await asyncio.to_thread(replicated_cluster.wait_healthy, 30)
        # First the master of the cancel channel's slot: the subscriptions must move too.
        victim = replicated_cluster.master_for_key("agent:{cancel}") if round_ == 0 else \
            replicated_cluster.masters()[round_ % 3]
        victim.kill(signal.SIGKILL)
        killed.append(victim)
        await asyncio.to_thread(replicated_cluster.wait_healthy, 30)  # a replica took over its slots

    await survive(a, b, upstream, fail, "cluster")


async def survive(a: Any, b: Any, upstream: Any, fail: Callable[[int], Awaitable[None]], name: str) -> None:
    """The load through servers a and b, with `fail` once per round; then everything checked."""
    load = await run_with_failures([a.url, b.url], fail)
    for server in (a, b):
        assert server.proc.poll() is None, server.log()
    await check_histories(load, a.url, name)
    assert await store_retries(a, b) > 0, "the failures were felt (and retried)"
    await cancel_across_workers(a, b, upstream)


async def store_retries(*servers: Any) -> float:
    async with httpx.AsyncClient(timeout=10) as client:
        scrapes = [(await client.get(s.url + "/metrics")).text for s in servers]
    return sum(float(line.split()[-1]) for text in scrapes for line in text.splitlines()
               if line.startswith("agent_store_retries_total"))


async def cancel_across_workers(a: Any, b: Any, upstream: Any) -> None:
    """A cancel sent to one server stops a turn running on the other, after the failovers."""
    upstream.reset()
    upstream.script({"tokens": 400, "pace_ms": 20})
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", a.url + "/agent/stream", json={"message": "long"}) as r:
            data = (line[6:] async for line in r.aiter_lines() if line.startswith("data: "))
            first = json.loads(await anext(data))
            r2 = await client.post(f"{b.url}/sessions/{first['session_id']}/cancel")
            assert r2.status_code == 202
            tail = [json.loads(event) async for event in data]
    end = tail[-1]
    assert end["type"] == "turn_end" and end["cancelled"] is True


class SingleRedis:
    """A redis-server of the test's own, with an fsync'ed append-only file: a restart keeps
    every write it acknowledged, as a production Redis with persistence does."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "SingleRedis":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            start_new_session=True)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


async def test_single_redis_restarted_under_load(tmp_path, start_server, upstream):
    store = SingleRedis(tmp_path).start()
    try:
        a, b = servers(start_server, upstream, REDIS_URL=f"redis://127.0.0.1:{store.port}/0",
                       TURN_LOCK_TTL_SECONDS=5)

        async def fail(round_: int) -> None:
            store.kill()
            await asyncio.sleep(0.3)  # down for a moment
            await asyncio.to_thread(store.start)

        await survive(a, b, upstream, fail, "single")
    finally:
        store.kill()
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        (LOG_DIR / "failover-single-redis.log").write_bytes((tmp_path / "redis.log").read_bytes())
