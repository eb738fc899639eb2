"""Turn lifecycle across workers: resume, one turn per session, cancel, idempotency,
crash recovery, graceful shutdown, heartbeats. Two server processes share one Redis (or one
Redis Cluster), so "another worker" is another process (as on another machine)."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse

from .conftest import BOTH_STORES
from .harness import eventually

pytestmark = BOTH_STORES  # every test once on a single Redis, once on a Redis Cluster

FULL_40 = " ".join(f"tok{i}" for i in range(40))


@pytest.fixture
def pair(start_server):
    """Two independent servers (one worker each) on one Redis."""
    env = {"TURN_LOCK_TTL_SECONDS": 2, "HEARTBEAT_SECONDS": 15}
    a, b = start_server(name="worker-a", wait=False, **env), start_server(name="worker-b", wait=False, **env)
    return a.wait_ready(), b.wait_ready()


async def read_sse(client, method, url, *, limit=None, **kw):
    """Events (and their SSE ids) until the stream ends or `limit` events were read."""
    events = []
    async with aconnect_sse(client, method, url, **kw) as source:
        assert source.response.status_code == 200, await source.response.aread()
        async for s in source.aiter_sse():
            event = json.loads(s.data)
            assert s.id == event["id"]
            events.append(event)
            if limit and len(events) >= limit:
                break
    return events


def text_of(events):
    return "".join(e["text"] for e in events if e["type"] == "text_delta")


async def test_resume_on_the_other_worker_with_last_event_id(pair, upstream):
    a, b = pair
    upstream.script({"tokens": 40, "pace_ms": 20})
    async with httpx.AsyncClient(timeout=30) as client:
        head = await read_sse(client, "POST", a.url + "/agent/stream", json={"message": "count"}, limit=8)
        sid = head[0]["session_id"]
        last_id = head[-1]["id"]
        tail = await read_sse(client, "GET", f"{b.url}/sessions/{sid}/stream", headers={"Last-Event-ID": last_id})
        assert tail[-1]["type"] == "turn_end"
        seqs = [int(e["id"].rsplit(":", 1)[1]) for e in head + tail]
        assert seqs == list(range(1, len(seqs) + 1)), "no gap, no duplicate"
        assert text_of(head + tail) == FULL_40 == tail[-1]["text"]
        # The query parameter works for clients that cannot set headers; a finished turn replays.
        again = await read_sse(client, "GET", f"{a.url}/sessions/{sid}/stream?last_event_id={last_id}")
        assert text_of(head + again) == FULL_40
        # Nothing after the last event: 204. Unknown session: 404.
        r = await client.get(f"{b.url}/sessions/{sid}/stream", headers={"Last-Event-ID": tail[-1]["id"]})
        assert r.status_code == 204
        r = await client.get(f"{b.url}/sessions/{'C' * 22}/stream")
        assert r.status_code == 404


async def test_resume_with_no_turn_is_204(pair, upstream):
    a, _ = pair
    async with httpx.AsyncClient(timeout=30) as client:
        sid = (await client.post(a.url + "/agent", json={"message": "hi"})).json()["session_id"]
        await client.delete(f"{a.url}/sessions/{sid}")
        r = await client.post(a.url + "/agent", json={"message": "hi"})
        fresh = r.json()["session_id"]
    async with httpx.AsyncClient(timeout=30) as client:
        # A brand-new session has a recent turn (replayable); after the log expires it would be 204.
        r = await client.get(f"{a.url}/sessions/{fresh}/stream")
        assert r.status_code == 200 and "turn_end" in r.text


async def test_resume_over_websocket_on_the_other_worker(pair, upstream):
    a, b = pair
    upstream.script({"tokens": 40, "pace_ms": 20})
    head = []
    async with websockets.connect(f"{a.ws_url}/agent/ws") as ws:
        await ws.send(json.dumps({"type": "message", "message": "count"}))
        while len(head) < 8:
            e = json.loads(await ws.recv())
            if e["type"] != "ping":
                head.append(e)
    sid, turn_id = head[0]["session_id"], head[0]["turn_id"]
    tail = []
    async with websockets.connect(f"{b.ws_url}/agent/ws?session_id={sid}") as ws:
        await ws.send(json.dumps({"type": "resume", "turn_id": turn_id, "last_event_id": head[-1]["id"]}))
        while not tail or tail[-1]["type"] not in ("turn_end", "error"):
            e = json.loads(await ws.recv())
            if e["type"] != "ping":
                tail.append(e)
    seqs = [int(e["id"].rsplit(":", 1)[1]) for e in head + tail]
    assert seqs == list(range(1, len(seqs) + 1))
    assert text_of(head + tail) == FULL_40


async def test_fifty_concurrent_messages_one_turn(pair, upstream):
    a, b = pair
    upstream.script({"tokens": 20, "pace_ms": 20})
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
        sid = (await client.post(a.url + "/agent", json={"message": "start"})).json()["session_id"]
        upstream.reset()
        # A long turn (2 s): the 50 requests arrive while it runs, even on a loaded box.
        upstream.script({"tokens": 100, "pace_ms": 20})

        async def send(i):
            server = a if i % 2 else b
            return await client.post(server.url + "/agent", json={"message": f"m{i}", "session_id": sid})

        results = await asyncio.gather(*(send(i) for i in range(50)))
    ok = [r for r in results if r.status_code == 200]
    busy = [r for r in results if r.status_code == 409]
    assert len(ok) == 1 and len(busy) == 49, [r.status_code for r in results]
    assert {r.json()["error"]["code"] for r in busy} == {"session_busy"}
    assert {r.json()["error"]["turn_id"] for r in busy} == {ok[0].json()["turn_id"]}
    assert all(r.json()["error"]["retryable"] for r in busy)
    assert len(upstream.requests()) == 1
    async with httpx.AsyncClient(timeout=30) as client:
        history = (await client.get(f"{b.url}/sessions/{sid}")).json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]


async def test_interrupt_policy_cancels_the_running_turn(pair, upstream):
    a, b = pair
    upstream.script({"tokens": 200, "pace_ms": 20}, {"text": "new answer"})
    async with httpx.AsyncClient(timeout=30) as client:
        head = await read_sse(client, "POST", a.url + "/agent/stream", json={"message": "long"}, limit=5)
        sid = head[0]["session_id"]
        r = await client.post(b.url + "/agent", json={"message": "never mind", "session_id": sid,
                                                      "on_busy": "interrupt"})
        assert r.status_code == 200 and r.json()["text"] == "new answer"
        view = (await client.get(f"{a.url}/sessions/{sid}")).json()
    assert [t["status"] for t in view["turn_records"]] == ["cancelled", "completed"]
    assert [m["role"] for m in view["messages"]] == ["user", "assistant", "user", "assistant"]
    assert view["messages"][1]["content"][0]["text"].startswith("tok0 tok1")


async def test_cancel_from_another_worker_stops_upstream_and_commits_partial(pair, upstream):
    a, b = pair
    upstream.script({"tokens": 200, "pace_ms": 20})
    async with httpx.AsyncClient(timeout=30) as client:
        events = []
        async with aconnect_sse(client, "POST", a.url + "/agent/stream", json={"message": "long"}) as source:
            async for s in source.aiter_sse():
                events.append(json.loads(s.data))
                if len(events) == 10:
                    sid = events[0]["session_id"]
                    r = await client.post(f"{b.url}/sessions/{sid}/cancel")
                    assert r.status_code == 202 and r.json()["cancelled_turn_id"] == events[0]["turn_id"]
        end = events[-1]
        assert end["type"] == "turn_end" and end["cancelled"] is True and end["stop_reason"] == "cancelled"
        assert 9 <= len([e for e in events if e["type"] == "text_delta"]) < 150
        closed = await eventually(lambda: upstream.requests()[0]["closed_early"], timeout=5)
        assert closed is True, "the upstream stream was closed: no more tokens billed"
        assert upstream.requests()[0]["events_sent"] < 150
        view = (await client.get(f"{b.url}/sessions/{sid}")).json()
    assert view["turn_records"][0]["status"] == "cancelled"
    assert view["messages"][1]["content"][0]["text"] == end["text"] == text_of(events)
    # Nothing to cancel now.
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{a.url}/sessions/{sid}/cancel")
        assert r.status_code == 200 and r.json()["cancelled_turn_id"] is None


async def test_cancel_over_websocket(pair, upstream):
    a, _ = pair
    upstream.script({"tokens": 200, "pace_ms": 20})
    async with websockets.connect(f"{a.ws_url}/agent/ws") as ws:
        await ws.send(json.dumps({"type": "message", "message": "long"}))
        events = []
        while not events or events[-1]["type"] not in ("turn_end", "error"):
            events.append(json.loads(await ws.recv()))
            if len(events) == 6:
                await ws.send(json.dumps({"type": "cancel"}))
    assert events[-1]["type"] == "turn_end" and events[-1]["cancelled"] is True


async def test_same_message_id_twice_is_one_turn(pair, upstream):
    a, b = pair
    upstream.script({"tokens": 10, "pace_ms": 20})
    async with httpx.AsyncClient(timeout=30) as client:
        sid = (await client.post(a.url + "/agent", json={"message": "hi"})).json()["session_id"]
        upstream.reset()
        upstream.script({"tokens": 10, "pace_ms": 20})
        body = {"message": "once", "session_id": sid, "message_id": "client-msg-1"}
        first, second = await asyncio.gather(client.post(a.url + "/agent", json=body),
                                             client.post(b.url + "/agent", json=body))
        third = await client.post(b.url + "/agent", json=body)  # a retry after it finished replays
    assert first.status_code == second.status_code == third.status_code == 200
    assert first.json()["turn_id"] == second.json()["turn_id"] == third.json()["turn_id"]
    assert first.json()["text"] == second.json()["text"] == third.json()["text"]
    assert len(upstream.requests()) == 1


async def test_disconnect_does_not_abort_unless_asked(pair, upstream):
    a, _ = pair
    upstream.script({"tokens": 30, "pace_ms": 20}, {"tokens": 100, "pace_ms": 20})
    async with httpx.AsyncClient(timeout=30) as client:
        head = await read_sse(client, "POST", a.url + "/agent/stream", json={"message": "go"}, limit=4)
        sid = head[0]["session_id"]
        view = await eventually(lambda: _completed(client, a, sid, 1), timeout=10)
        assert view["turn_records"][0]["status"] == "completed"
        head = await read_sse(client, "POST", a.url + "/agent/stream", limit=4,
                              json={"message": "go", "session_id": sid, "cancel_on_disconnect": True})
        view = await eventually(lambda: _completed(client, a, sid, 2), timeout=10)
        assert view["turn_records"][1]["status"] == "cancelled"


async def _completed(client, server, sid, turns):
    view = (await client.get(f"{server.url}/sessions/{sid}")).json()
    return view if len(view["turn_records"]) >= turns else None


async def test_sigkill_mid_turn_interrupts_followers_and_unlocks(pair, upstream):
    a, b = pair
    upstream.script({"tokens": 300, "pace_ms": 20})
    async with httpx.AsyncClient(timeout=30) as client:
        head = await read_sse(client, "POST", a.url + "/agent/stream", json={"message": "long"}, limit=5)
        sid = head[0]["session_id"]
        follower = asyncio.create_task(read_sse(client, "GET", f"{b.url}/sessions/{sid}/stream",
                                                headers={"Last-Event-ID": head[-1]["id"]}))
        await asyncio.sleep(0.5)
        a.stop(signal.SIGKILL)
        tail = await asyncio.wait_for(follower, 15)
        assert tail[-1]["type"] == "error" and tail[-1]["code"] == "interrupted" and tail[-1]["retryable"]
        view = (await client.get(f"{b.url}/sessions/{sid}")).json()
        assert view["messages"] == [], "no half turn committed"
        upstream.script({"text": "back"})
        r = await client.post(b.url + "/agent", json={"message": "again", "session_id": sid})
        assert r.status_code == 200 and r.json()["text"] == "back"


async def test_sigkill_then_new_message_on_the_session(pair, upstream):
    a, b = pair
    upstream.script({"tokens": 300, "pace_ms": 20})
    async with httpx.AsyncClient(timeout=30) as client:
        head = await read_sse(client, "POST", a.url + "/agent/stream", json={"message": "long"}, limit=5)
        sid = head[0]["session_id"]
        a.stop(signal.SIGKILL)
        r = await client.post(b.url + "/agent", json={"message": "hello?", "session_id": sid})
        assert r.status_code == 409  # the dead worker's lock has not expired yet

        async def unlocked():
            upstream.script({"text": "recovered"})
            r = await client.post(b.url + "/agent", json={"message": "hello?", "session_id": sid})
            if r.status_code != 200:
                upstream.reset()
            return r.status_code == 200 and r

        r = await eventually(unlocked, timeout=10, interval=0.5)
        assert r and r.json()["text"] == "recovered"
        # The dead turn's log now ends with `interrupted` for anyone resuming it.
        old = await read_sse(client, "GET", f"{b.url}/sessions/{sid}/stream?last_event_id={head[-1]['id']}")
        assert old[-1]["type"] == "turn_end" and old[-1]["text"] == "recovered"


async def test_sigterm_finishes_short_turns_and_ends_long_streams(start_server, upstream):
    server = start_server(GRACEFUL_SHUTDOWN_SECONDS=1.5)
    upstream.script({"tokens": 400, "pace_ms": 20}, {"tokens": 20, "pace_ms": 20})
    async with httpx.AsyncClient(timeout=30) as client:
        long_head = await read_sse(client, "POST", server.url + "/agent/stream", json={"message": "long"}, limit=3)
        long_sid = long_head[0]["session_id"]
        async with websockets.connect(f"{server.ws_url}/agent/ws") as ws, \
                websockets.connect(f"{server.ws_url}/agent/ws?session_id={long_sid}") as long_ws:
            short = asyncio.create_task(read_sse(client, "POST", server.url + "/agent/stream",
                                                 json={"message": "short"}))
            long_tail = asyncio.create_task(read_sse(client, "GET", f"{server.url}/sessions/{long_sid}/stream",
                                                     headers={"Last-Event-ID": long_head[-1]["id"]}))
            await long_ws.send(json.dumps({"type": "resume", "last_event_id": long_head[-1]["id"]}))
            await asyncio.sleep(0.3)
            server.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd.code == 1012
            # A WebSocket following the long turn gets its end too, then the 1012 close.
            ws_events = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    ws_events.append(json.loads(await asyncio.wait_for(long_ws.recv(), 10)))
            assert closed.value.rcvd.code == 1012
            last = [e for e in ws_events if e["type"] not in ("ping", "pong")][-1]
            assert last["type"] == "error" and last["code"] == "server_restarting" and last["retryable"]
        short_events = await asyncio.wait_for(short, 10)
        assert short_events[-1]["type"] == "turn_end", "a turn shorter than the grace period completes"
        tail = await asyncio.wait_for(long_tail, 10)
        assert tail[-1]["type"] == "error" and tail[-1]["code"] == "server_restarting" and tail[-1]["retryable"]
    assert server.proc.wait(15) is not None


async def test_sigterm_gives_websocket_turns_their_grace(start_server, upstream):
    """A worker whose only client is a WebSocket running a slow turn: SIGTERM still gives
    the turn GRACEFUL_SHUTDOWN_SECONDS, the socket carries it to `turn_end`, then 1012."""
    server = start_server(GRACEFUL_SHUTDOWN_SECONDS=10)
    upstream.script({"tokens": 40, "pace_ms": 50})

    async def next_event(ws):
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 15))
            if event["type"] not in ("ping", "pong"):
                return event

    async with websockets.connect(f"{server.ws_url}/agent/ws") as ws, \
            websockets.connect(f"{server.ws_url}/agent/ws") as idle:
        await ws.send(json.dumps({"type": "message", "message": "slow"}))
        events = [await next_event(ws)]
        while events[-1]["type"] != "text_delta":
            events.append(await next_event(ws))
        server.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient(timeout=5) as client:  # draining: no longer ready
            assert await eventually(lambda: _not_ready(client, server), timeout=5)
        await idle.send(json.dumps({"type": "message", "message": "too late"}))
        refused = await next_event(idle)
        assert refused["type"] == "error" and refused["code"] == "server_restarting", refused
        while events[-1]["type"] not in ("turn_end", "error"):
            events.append(await next_event(ws))
        assert events[-1]["type"] == "turn_end", events[-1]
        assert not events[-1]["cancelled"] and text_of(events) == FULL_40
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert server.proc.wait(15) is not None


async def _not_ready(client, server):
    r = await client.get(server.url + "/ready")
    return r.status_code == 503 and not r.json()["accepting_turns"]


async def test_heartbeats_keep_quiet_streams_alive(start_server, upstream):
    server = start_server(HEARTBEAT_SECONDS=0.2, WS_PING_SECONDS=0.2)
    upstream.script({"text": "late", "ttft_ms": 1200})
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", server.url + "/agent/stream", json={"message": "slow"}) as r:
            body = (await r.aread()).decode()
    assert body.count(": keep-alive") >= 3 and '"type":"turn_end"' in body
    async with websockets.connect(f"{server.ws_url}/agent/ws") as ws:
        await asyncio.sleep(0.7)
        frames = []
        while True:
            try:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 0.05)))
            except asyncio.TimeoutError:
                break
        assert {"type": "ping"} in frames
