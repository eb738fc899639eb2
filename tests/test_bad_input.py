"""Bad input found by an adversarial pass: each one used to be a 500 (or a WebSocket handler
crash); each must be a 4xx with a stable code, over real sockets, and store nothing.

- a list where a string is compared with a set (`on_busy`, an image's `media_type`): unhashable;
- JSON nested ~1,000+ deep: RecursionError in json.loads;
- a lone surrogate (`"\\ud800"`) in any client string: it cannot be encoded as UTF-8, so it
  failed later (upstream request, chat id hash, Redis) as a `retryable: true` 500;
- `{"type":"resume","last_event_id":5}` and other bad frames killing the WebSocket handler.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import httpx
import pytest
import websockets

from .harness import Server, session_keys, ws_turn

PATHS = ["/agent", "/agent/stream"]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="


def deep(n: int) -> str:
    return "[" * n + "]" * n


def deep_object(n: int, leaf: str = "1") -> str:
    return '{"a":' * n + leaf + "}" * n


def assert_clean_log(server: Server) -> None:
    log = server.log_path.read_text(errors="replace")
    for marker in ("Traceback", "Exception in ASGI application", "unhandled error"):
        assert marker not in log, f"{marker!r} in the server log:\n{log[-3000:]}"


async def post_raw(client: httpx.AsyncClient, path: str, raw: str | bytes) -> httpx.Response:
    content = raw.encode() if isinstance(raw, str) else raw
    return await client.post(path, content=content, headers={"content-type": "application/json"})


def assert_error(r: httpx.Response, status: int, code: str, mentions: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, r.text
    assert error["retryable"] is False, r.text
    if mentions is not None:
        assert mentions in error["message"], r.text
    return error


# -- HTTP ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
async def test_on_busy_list_is_400(shared_server, upstream, path):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=15) as client:
        for value in ("[]", "{}", '["reject"]'):
            r = await post_raw(client, path, '{"message":"hi","on_busy":' + value + "}")
            assert assert_error(r, 400, "invalid_request")["field"] == "on_busy"
    assert upstream.requests() == []
    assert_clean_log(shared_server)


@pytest.mark.parametrize("path", PATHS)
async def test_image_media_type_list_is_400(shared_server, upstream, path):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=15) as client:
        for media_type in ([], ["image/png"], {"x": 1}):
            body = {"message": [{"type": "image", "source": {"type": "base64", "media_type": media_type,
                                                               "data": PNG}}]}
            r = await client.post(path, json=body)
            assert_error(r, 400, "invalid_image", "media_type")
    assert upstream.requests() == []
    assert_clean_log(shared_server)


@pytest.mark.parametrize("raw", [deep(1000), deep(5000), deep_object(1000), '{"message":' + deep(3000) + "}"],
                         ids=["list-1000", "list-5000", "object-1000", "in-message-3000"])
async def test_deep_nesting_is_400(shared_server, upstream, raw):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=15) as client:
        for path in [*PATHS, "/api/chat"]:
            assert_error(await post_raw(client, path, raw), 400, "invalid_json", "nested too deeply")
    assert upstream.requests() == []
    assert_clean_log(shared_server)


async def test_deep_response_schema_is_400(shared_server, upstream):
    """Nesting the parser accepts but jsonschema (which recurses) would not survive."""
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=15) as client:
        schema = '{"type":"object","properties":{"a":' * 150 + '{"type":"integer"}' + "}}" * 150
        r = await post_raw(client, "/agent", '{"message":"hi","response_schema":' + schema + "}")
        assert assert_error(r, 400, "invalid_request", "nested deeper")["field"] == "response_schema"
    assert upstream.requests() == []
    assert_clean_log(shared_server)


# (raw JSON body, the field the error must name)
SURROGATE_BODIES = [
    ('{"message":"hi \\ud800"}', "`message`"),
    ('{"message":"\\udfff"}', "`message`"),
    ('{"message":"hi","system":"be nice \\ud800"}', "`system`"),
    ('{"message":[{"type":"text","text":"a\\udc00b"}]}', "`message[0].text`"),
    ('{"message":[{"type":"text","text":"ok"},{"type":"image","source":{"type":"url","url":"https://x.example/\\ud800"}}]}',
     "`message[1].source`.url"),
    ('{"message":"hi","response_schema":{"type":"object","description":"\\ud800"}}', "`response_schema`"),
    ('{"message":"hi","response_schema":{"type":"object","properties":{"\\ud800":{"type":"string"}}}}',
     "`response_schema`"),
]


@pytest.mark.parametrize("path", PATHS)
async def test_lone_surrogates_are_400(shared_server, upstream, redis_url, path):
    before = session_keys(redis_url)
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=15) as client:
        for raw, field in SURROGATE_BODIES:
            r = await post_raw(client, path, raw)
            assert_error(r, 400, "invalid_request", field)
            assert "surrogate" in r.json()["error"]["message"]
        # A valid surrogate pair (how JSON.stringify-less clients escape an emoji) is fine.
        upstream.script({"text": "ok"})
        r = await post_raw(client, "/agent", '{"message":"smile \\ud83d\\ude00"}')
        assert r.status_code == 200, r.text
        # Encoded surrogates in the raw bytes are not UTF-8: the body is not JSON text.
        r = await post_raw(client, path, b'{"message":"hi \xed\xa0\x80"}')
        assert_error(r, 400, "invalid_json")
    assert [q["body"]["messages"][-1]["content"][0]["text"] for q in upstream.requests()] == ["smile \U0001F600"]
    assert len(session_keys(redis_url) - before) == 1
    assert_clean_log(shared_server)


async def test_lone_surrogates_in_chat_requests_are_400(shared_server, upstream, redis_url):
    before = session_keys(redis_url)
    parts = '[{"type":"text","text":"hi"}]'
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=15) as client:
        r = await post_raw(client, "/api/chat", '{"id":"\\ud800","messages":[{"role":"user","parts":' + parts + "}]}")
        assert assert_error(r, 400, "invalid_request", "`id`")["field"] == "id"
        r = await post_raw(client, "/api/chat", '{"id":"chat-1","messages":[{"role":"user","parts":'
                                                '[{"type":"text","text":"x\\udbff"}]}]}')
        assert_error(r, 400, "invalid_request", "`messages[-1].parts[0].text`")
        r = await post_raw(client, "/api/chat", '{"id":"chat-1","system":"\\ud800","messages":[{"role":"user",'
                                                '"parts":' + parts + "}]}")
        assert_error(r, 400, "invalid_request", "`system`")
    assert upstream.requests() == []
    assert session_keys(redis_url) - before == set()
    assert_clean_log(shared_server)


async def test_chat_id_with_a_trailing_newline_is_not_used_as_a_session_id(shared_server, upstream):
    """`valid_id`'s `$` accepts a trailing newline; as a session id it reached the x-session-id
    header and broke the response. Such a chat id maps to a derived session like any other."""
    upstream.script({"text": "fine"})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=15) as client:
        r = await client.post("/api/chat", json={"id": "B" * 22 + "\n", "messages": [
            {"role": "user", "parts": [{"type": "text", "text": "hi"}]}]})
        assert r.status_code == 200 and "\n" not in r.headers["x-session-id"], r.text
        assert "data: [DONE]" in r.text
        r = await client.post("/agent", json={"message": "hi", "session_id": "B" * 22 + "\n"})
        assert_error(r, 400, "invalid_session_id")
    assert_clean_log(shared_server)


async def test_non_ascii_digits_in_last_event_id_resume_from_the_start(shared_server, upstream):
    """"²".isdigit() is true but int("²") raises: a Last-Event-ID `<turn>:²` was a 500."""
    upstream.script({"text": "one two"})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=15) as client:
        done = (await client.post("/agent", json={"message": "hi"})).json()
        sid, tid = done["session_id"], done["turn_id"]
        r = await client.get(f"/sessions/{sid}/stream", headers={"last-event-id": f"{tid}:".encode() + b"\xb2"})
        assert r.status_code == 200 and '"type":"turn_start"' in r.text, r.text
    assert_clean_log(shared_server)


# -- WebSockets --------------------------------------------------------------------------------
BAD_AGENT_FRAMES = [
    # (frame, the code of the error frame that must answer it)
    ('{"type":"message","message":"hi","on_busy":[]}', "invalid_request"),
    (json.dumps({"type": "message", "message": [{"type": "image", "source": {
        "type": "base64", "media_type": [], "data": PNG}}]}), "invalid_image"),
    ('{"type":"message","message":"\\ud800"}', "invalid_request"),
    ('{"type":"message","message":[{"type":"text","text":"\\udc00"}]}', "invalid_request"),
    ('{"type":"message","message":"hi","system":"\\ud800"}', "invalid_request"),
    (deep(1000), "invalid_json"),
    ('{"type":"message","message":' + deep(5000) + "}", "invalid_json"),
    ('{"type":"resume","last_event_id":5}', "invalid_request"),
    ('{"type":"resume","last_event_id":["x"]}', "invalid_request"),
    ('{"type":"resume","session_id":5}', "invalid_session_id"),
    ('{"type":[]}', "invalid_request"),
    (b"\x00binary", "invalid_request"),
]


async def recv_json(ws: Any, timeout: float = 10) -> dict[str, Any]:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame.get("type") != "ping":  # the server's idle heartbeat
            return frame


async def test_agent_ws_bad_frames_get_an_error_and_the_socket_stays_usable(shared_server, upstream):
    async with websockets.connect(f"{shared_server.ws_url}/agent/ws") as ws:
        upstream.script({"text": "bound"})
        events = await ws_turn(ws, "bind this socket to a session")  # the socket is now bound
        assert events[-1]["type"] == "turn_end", events
        for frame, code in BAD_AGENT_FRAMES:
            await ws.send(frame)
            error = await recv_json(ws)
            assert error["type"] == "error" and error["code"] == code, (frame[:80], error)
            assert error["retryable"] is False and isinstance(error["message"], str)
            await ws.send('{"type":"ping"}')
            assert await recv_json(ws) == {"type": "pong"}, frame[:80]
        # A string last_event_id that names no event still resumes from the start (as for SSE).
        await ws.send(json.dumps({"type": "resume", "last_event_id": "nonsense"}))
        replay = [await recv_json(ws)]
        while replay[-1]["type"] not in ("turn_end", "error"):
            replay.append(await recv_json(ws))
        assert replay[0]["type"] == "turn_start" and replay[-1]["type"] == "turn_end"
        # And the socket still runs turns.
        upstream.script({"text": "still here"})
        events = await ws_turn(ws, "again")
        assert events[-1]["type"] == "turn_end" and events[-1]["text"] == "still here"
    assert_clean_log(shared_server)


async def test_chat_ws_bad_frames_get_an_error_and_the_socket_stays_usable(shared_server, upstream, redis_url):
    before = session_keys(redis_url)
    user = '{"role":"user","parts":[{"type":"text","text":"hi"}]}'
    frames = [
        ('{"type":"send","requestId":"r1","id":"\\ud800","messages":[' + user + "]}", "`id`"),
        ('{"type":"send","requestId":"r2","id":"chat-2","messages":[{"role":"user","parts":'
         '[{"type":"text","text":"\\ud800"}]}]}', "surrogate"),
        ('{"type":"send","requestId":"r3","id":"chat-3","messages":[' + user + '],"body":{"on_busy":[]}}',
         "on_busy"),
        ('{"type":"send","requestId":"r4","id":"chat-4","messages":[{"role":"user","parts":[{"type":"file",'
         '"mediaType":"image/png","url":"https://x.example/\\udfff"}]}]}', "surrogate"),
        ('{"type":"resume","requestId":"r5","id":"\\udc00"}', "`id`"),
        ('{"type":"resume","requestId":"r6","id":"chat-6","lastSequence":"5"}', "lastSequence"),
    ]
    # Frames without a usable requestId cannot be answered (the client could not correlate an
    # answer): they are dropped, and the socket goes on.
    unanswerable = ['{"type":"send","requestId":"\\ud800","id":"c"}', deep(1000),
                    '{"type":"send","requestId":"r7","x":' + deep(3000) + "}", '{"requestId":5}']
    async with websockets.connect(f"{shared_server.ws_url}/api/chat/ws") as ws:
        for frame, mentions in frames:
            await ws.send(frame)
            answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
            request_id = json.loads(frame.replace("\\u", "u"))["requestId"]
            assert answer["type"] == "error" and answer["requestId"] == request_id, (frame[:80], answer)
            assert mentions in answer["errorText"], answer
        for frame in unanswerable:
            await ws.send(frame)
        probe = "probe-" + secrets.token_hex(4)
        await ws.send(json.dumps({"type": "resume", "requestId": probe, "id": "never-used-" + probe}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"type": "no-active", "requestId": probe}
    assert upstream.requests() == []
    assert session_keys(redis_url) - before == set()
    assert_clean_log(shared_server)


# -- an unexpected failure: answered, logged once, never the end of the connection -----------------
KEY = "k-" + secrets.token_hex(12)


def in_process_client() -> Any:
    """The app in this process (offline model, memory store), so a handler can be made to fail."""
    from starlette.testclient import TestClient

    from server.app import create_app
    from server.config import Settings

    app = create_app(Settings.from_env({"AGENT_API_KEYS": KEY}))
    return TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000),
                      headers={"Authorization": f"Bearer {KEY}"}, raise_server_exceptions=False)


def test_an_unexpected_error_in_a_frame_is_answered_and_the_socket_lives_on(monkeypatch):
    from server.transports import ai_sdk_ws, websocket

    async def boom(self: Any, *args: Any) -> None:
        raise TypeError("a bug")

    logged: list[str] = []
    monkeypatch.setattr(websocket.AgentSocket, "_cancel", boom)
    monkeypatch.setattr(ai_sdk_ws.ChatSocket, "_abort", boom)
    monkeypatch.setattr(websocket.log, "exception", lambda msg, *a, **k: logged.append(msg))
    monkeypatch.setattr(ai_sdk_ws.log, "exception", lambda msg, *a, **k: logged.append(msg))
    with in_process_client() as client:
        with client.websocket_connect("/agent/ws") as ws:
            ws.send_text('{"type":"cancel"}')
            assert ws.receive_json() == {"type": "error", "code": "internal", "message": "Internal error.",
                                         "retryable": False}  # a bug fails the same way again
            ws.send_text('{"type":"ping"}')
            assert ws.receive_json() == {"type": "pong"}
        assert logged == ["unexpected error handling a WebSocket frame"]
        with client.websocket_connect("/api/chat/ws") as ws:
            ws.send_text('{"type":"abort","requestId":"r1"}')
            assert ws.receive_json() == {"type": "error", "requestId": "r1", "errorText": "Internal error."}
            ws.send_text('{"type":"resume","requestId":"r2","id":"some-chat"}')
            assert ws.receive_json() == {"type": "no-active", "requestId": "r2"}
        assert logged[1:] == ["unexpected error handling a WebSocket chat frame"]


@pytest.mark.parametrize("exc,retryable", [
    (TypeError("a bug"), False),
    (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), False),
    (RecursionError(), False),
    (ConnectionResetError(), True),  # I/O: a retry may well succeed
])
def test_an_unexpected_http_error_is_retryable_only_when_transient(monkeypatch, exc, retryable):
    import server.app

    async def boom(request: Any) -> None:
        raise exc

    monkeypatch.setattr(server.app, "health", boom)
    with in_process_client() as client:
        r = client.get("/health")
    assert r.status_code == 500
    assert r.json()["error"] == {"code": "internal", "message": "Internal error.", "retryable": retryable}
