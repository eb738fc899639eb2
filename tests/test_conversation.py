"""A conversation across transports and workers, surviving a restart (Redis sessions)."""

from __future__ import annotations

import json

import httpx
import websockets
from httpx_sse import aconnect_sse

from .harness import Server, history_texts, ws_turn


async def sse_turn(client: httpx.AsyncClient, body: dict) -> list[dict]:
    events = []
    async with aconnect_sse(client, "POST", "/agent/stream", json=body) as source:
        assert source.response.status_code == 200
        assert source.response.headers["cache-control"] == "no-cache"
        assert source.response.headers["x-accel-buffering"] == "no"
        async for sse in source.aiter_sse():
            event = json.loads(sse.data)
            assert sse.id == event["id"], "every event carries its log id as the SSE id"
            events.append(event)
    return events


async def ws_session_turn(server: Server, session_id: str, text: str) -> list[dict]:
    async with websockets.connect(f"{server.ws_url}/agent/ws?session_id={session_id}") as ws:
        return await ws_turn(ws, text)


async def test_three_turns_across_transports_and_workers_then_restart(start_server, upstream):
    server = start_server(workers=2)
    upstream.script({"text": "Hello Ada."}, {"text": "Your name is Ada."}, {"text": "Goodbye Ada."},
                    {"text": "Still here."})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        # Turn 1: plain JSON, the seed's body shape.
        r = await client.post("/agent", json={"message": "Hi, I am Ada.", "system": "Be brief."})
        assert r.status_code == 200, r.text
        first = r.json()
        session_id = first["session_id"]
        assert first["text"] == "Hello Ada."
        assert first["stop_reason"] == "end_turn"
        assert set(first["usage"]) == {"input_tokens", "output_tokens", "cache_creation_input_tokens",
                                       "cache_read_input_tokens"}
        assert first["usage"]["output_tokens"] > 0
        assert first["estimated_cost_usd"] > 0
        assert first["request_id"].startswith("req_")

        # Turn 2: SSE, same session.
        events = await sse_turn(client, {"message": "What is my name?", "session_id": session_id,
                                         "system": "Be brief."})
        assert events[0]["type"] == "turn_start" and events[0]["session_id"] == session_id
        assert "".join(e["text"] for e in events if e["type"] == "text_delta") == "Your name is Ada."
        assert events[-1]["type"] == "turn_end" and events[-1]["stop_reason"] == "end_turn"

    # Turn 3: WebSocket.
    events = await ws_session_turn(server, session_id, "Bye!")
    assert events[-1]["type"] == "turn_end", events
    assert events[-1]["text"] == "Goodbye Ada."

    sent = upstream.requests()
    assert len(sent) == 3
    assert history_texts(sent[2]["body"]["messages"]) == [
        ("user", "Hi, I am Ada."), ("assistant", "Hello Ada."),
        ("user", "What is my name?"), ("assistant", "Your name is Ada."),
        ("user", "Bye!"),
    ]
    assert sent[0]["auth"] == "bearer"
    assert sent[0]["headers"]["authorization"] == "<redacted>"

    # Restart: history is in Redis, not in the processes.
    server.stop()
    server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.get(f"/sessions/{session_id}")
        assert r.status_code == 200
        view = r.json()
        assert len(view["messages"]) == 6
        assert view["turns"] == 3
        assert view["usage"]["output_tokens"] > 0
        r = await client.post("/agent", json={"message": "Are you there?", "session_id": session_id})
        assert r.json()["text"] == "Still here."
    assert len(upstream.requests()[-1]["body"]["messages"]) == 7


async def test_new_session_per_request_without_session_id(shared_server):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        a = (await client.post("/agent", json={"message": "one"})).json()
        b = (await client.post("/agent", json={"message": "two"})).json()
        assert a["session_id"] != b["session_id"]
        assert len(a["session_id"]) >= 22  # 128 random bits, URL-safe


async def test_delete_session(shared_server):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        sid = (await client.post("/agent", json={"message": "one"})).json()["session_id"]
        assert (await client.delete(f"/sessions/{sid}")).status_code == 204
        assert (await client.get(f"/sessions/{sid}")).status_code == 404
        r = await client.post("/agent", json={"message": "again", "session_id": sid})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


async def test_health_and_ready(shared_server):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        health = (await client.get("/health")).json()
        assert health["status"] == "ok" and health["upstream"] == "anthropic" and health["store"] == "redis"
        ready = await client.get("/ready")
        assert ready.status_code == 200 and ready.json()["store"] is True


async def test_websocket_many_turns_ping_and_bad_frames(shared_server, upstream):
    upstream.script({"text": "first"}, {"text": "second"})
    async with websockets.connect(f"{shared_server.ws_url}/agent/ws") as ws:
        await ws.send("this is not json")
        assert json.loads(await ws.recv())["code"] == "invalid_json"
        await ws.send(json.dumps({"type": "dance"}))
        assert json.loads(await ws.recv())["code"] == "invalid_request"
        await ws.send(json.dumps({"type": "message", "message": ""}))
        assert json.loads(await ws.recv())["code"] == "invalid_request"
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}
        answers = []
        for text in ("one", "two"):
            await ws.send(json.dumps({"type": "message", "message": text}))
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "turn_end":
                    answers.append((event["session_id"], event["text"]))
                    break
        assert [a[1] for a in answers] == ["first", "second"]
        assert answers[0][0] == answers[1][0], "one connection, one session"
    assert len(upstream.requests()[-1]["body"]["messages"]) == 3


async def test_websocket_disconnect_mid_turn_keeps_the_turn(shared_server, upstream):
    upstream.script({"tokens": 30, "pace_ms": 20})
    async with websockets.connect(f"{shared_server.ws_url}/agent/ws") as ws:
        await ws.send(json.dumps({"type": "message", "message": "long one"}))
        start = json.loads(await ws.recv())
        assert start["type"] == "turn_start"
        session_id = start["session_id"]
    # The socket is gone; the turn still completes and commits.
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        from .harness import eventually

        async def committed():
            r = await client.get(f"/sessions/{session_id}")
            return r.json()["turns"] == 1 and r.json()

        view = await eventually(committed, timeout=10)
        assert view, "the turn was not committed after the client left"
        assert view["messages"][1]["content"][0]["text"] == " ".join(f"tok{i}" for i in range(30))
        assert (await client.get("/health")).status_code == 200
