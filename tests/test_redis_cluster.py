"""REDIS_CLUSTER=true on a real three-master Redis Cluster: sessions land on every master and
all succeed (a plain client fails on every key another node serves), a turn costs two Redis
round trips there too, and WebSocket tickets stay single-use. The lifecycle suite
(test_lifecycle.py), the store contract (test_store.py) and the shared rate limits
(test_security.py) also run on the cluster; failover is in test_redis_failover.py."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import pytest
import websockets

from .harness import ws_turn

pytestmark = pytest.mark.parametrize("store_env", ["cluster"], indirect=True)


def command_calls(cluster) -> Counter[str]:  # type: ignore[no-untyped-def]
    """Commands run so far, summed over the masters (INFO commandstats; the commands a script
    runs count too, so only EVALSHA and SCRIPT LOAD tell round trips)."""
    calls: Counter[str] = Counter()
    for node in cluster.masters():
        for name, stats in node.client().info("commandstats").items():
            calls[name.removeprefix("cmdstat_")] += int(stats["calls"])
    return calls


async def sessions_on_every_master(client: httpx.AsyncClient, urls: list[str], cluster,  # type: ignore[no-untyped-def]
                                   each: int) -> tuple[list[str], int]:
    """New sessions (one turn each, sent to the servers in turn) until every master holds
    `each` of them: where a session lands depends on its random id. `each` per master, and
    how many sessions (turns) that took."""
    homes: dict[int, list[str]] = {node.port: [] for node in cluster.masters()}
    sent = 0
    while min(map(len, homes.values())) < each:
        r = await client.post(urls[sent % len(urls)] + "/agent", json={"message": f"q{sent}"})
        assert r.status_code == 200, r.text
        sid = r.json()["session_id"]
        homes[cluster.master_for_key(f"agent:{{{sid}}}:meta").port].append(sid)
        sent += 1
        assert sent < 100
    return [sid for sids in homes.values() for sid in sids[:each]], sent


async def test_sessions_on_every_master_two_round_trips_per_turn(start_server, upstream, redis_cluster,
                                                                 store_client):
    a, b = start_server(name="cluster-a", wait=False), start_server(name="cluster-b", wait=False)
    a.wait_ready(), b.wait_ready()
    before = command_calls(redis_cluster)
    async with httpx.AsyncClient(timeout=30) as client:
        sids, first_turns = await sessions_on_every_master(client, [a.url, b.url], redis_cluster, 4)
        upstream.script(*[{"text": "ok"}] * 12)
        replies = await asyncio.gather(*(client.post((b, a)[n % 2].url + "/agent", json={"message": "again",
                                                                                        "session_id": sid})
                                         for n, sid in enumerate(sids)))  # the other server sees the first turn
        assert [(r.status_code, r.json()["text"]) for r in replies] == [(200, "ok")] * 12
    after = command_calls(redis_cluster)
    spent = {name: after[name] - before[name] for name in after}
    # A server's first begins and commits on a master find the script missing there: NOSCRIPT,
    # then SCRIPT LOAD and EVALSHA again in one write. Every other turn: one EVALSHA each.
    assert spent["evalsha"] - spent["script|load"] == 2 * (first_turns + 12), "two round trips per turn"
    for sid in sids:
        assert len(store_client.lrange(f"agent:{{{sid}}}:msgs", 0, -1)) == 4


async def test_websocket_ticket_is_single_use_across_servers(start_server, upstream):
    key = "sk-agent-cluster-ticket-key-0123456789"
    a = start_server(name="ticket-a", AGENT_API_KEYS=key, wait=False)
    b = start_server(name="ticket-b", AGENT_API_KEYS=key)
    a.wait_ready()
    upstream.script({"text": "via ticket"})
    async with httpx.AsyncClient(timeout=30) as client:
        ticket = (await client.post(a.url + "/ws-ticket", headers={"Authorization": f"Bearer {key}"})).json()["ticket"]
    async with websockets.connect(f"{b.ws_url}/agent/ws?ticket={ticket}") as ws:
        assert (await ws_turn(ws, "hi"))[-1]["text"] == "via ticket"
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{a.ws_url}/agent/ws?ticket={ticket}")
    assert refused.value.response.status_code == 401



async def test_followers_on_another_server_read_logs_on_every_master(start_server, upstream, redis_cluster):
    """Streams running on one server, each followed from the other: the event-log flush writes
    to every master in one pass, and each follower's XREAD BLOCK reads its log's node."""
    a, b = start_server(name="logs-a", wait=False), start_server(name="logs-b", wait=False)
    a.wait_ready(), b.wait_ready()
    async with httpx.AsyncClient(timeout=30) as client:
        sids, _ = await sessions_on_every_master(client, [a.url], redis_cluster, 3)
        upstream.script(*[{"tokens": 30, "pace_ms": 20}] * 9)

        async def run_and_follow(sid: str) -> tuple[str, str]:
            body = {"message": "count", "session_id": sid}
            async with client.stream("POST", a.url + "/agent/stream", json=body) as r:
                data = (json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: "))
                await anext(data)  # turn_start: running
                followed = await client.get(f"{b.url}/sessions/{sid}/stream")  # from the start, on b
                own = [event async for event in data]
            events = [json.loads(line[6:]) for line in followed.text.splitlines() if line.startswith("data: ")]
            assert followed.status_code == 200 and events and events[-1]["type"] == "turn_end", \
                (followed.status_code, followed.text[-500:])
            return own[-1]["text"], events[-1]["text"]

        results = await asyncio.gather(*(run_and_follow(sid) for sid in sids))
    full = " ".join(f"tok{i}" for i in range(30))
    assert results == [(full, full)] * 9
