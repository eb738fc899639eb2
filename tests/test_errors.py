"""Every upstream fault maps to its documented code; every bad input is a 4xx that stores nothing."""

from __future__ import annotations

import json

import httpx
import pytest
from httpx_sse import aconnect_sse

from .harness import session_keys

UPSTREAM_FAULTS = [
    # (fake script, HTTP status we answer, our code, retryable)
    ({"status": 429, "retry_after": 7}, 429, "rate_limited", True),
    ({"status": 529}, 503, "upstream_overloaded", True),
    ({"status": 500}, 502, "upstream_unavailable", True),
    ({"status": 504}, 504, "upstream_timeout", True),
    ({"status": 401}, 502, "upstream_misconfigured", False),
    ({"status": 403}, 502, "upstream_misconfigured", False),
    ({"status": 404, "message": "model: claude-nope"}, 502, "upstream_misconfigured", False),
    ({"status": 400, "message": "messages: roles must alternate"}, 400, "bad_request", False),
    ({"status": 400, "message": "prompt is too long: 250000 tokens > 200000 maximum"}, 400,
     "context_too_long", False),
    ({"status": 413}, 400, "context_too_long", False),
]


@pytest.fixture(scope="module")
def server(fake, redis_url):
    from .harness import Server, server_env

    s = Server(server_env(fake, redis_url, UPSTREAM_TIMEOUT_SECONDS=1, MAX_MESSAGE_CHARS=1000,
                          MAX_BODY_BYTES=4096), name="errors").start()
    yield s
    s.stop()


@pytest.mark.parametrize("script,status,code,retryable", UPSTREAM_FAULTS,
                         ids=[f"{f[0]['status']}-{f[2]}" for f in UPSTREAM_FAULTS])
async def test_upstream_status_maps_to_code(server, upstream, script, status, code, retryable):
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for path in ("/agent", "/agent/stream"):
            upstream.script(script)
            r = await client.post(path, json={"message": "hello"})
            assert r.status_code == status, (path, r.text)
            error = r.json()["error"]
            assert error["code"] == code and error["retryable"] is retryable
            assert "sk-ant" not in r.text and script.get("message", "@@") not in r.text
            if code == "rate_limited":
                assert r.headers["retry-after"] == "7" and error["retry_after"] == 7
            # A failed turn stores nothing: the session exists only if a turn committed.
            sid = r.json()["session_id"]
            view = (await client.get(f"/sessions/{sid}")).json()
            assert view["messages"] == []
            assert [(t["status"], t["error"]) for t in view["turn_records"]] == [("failed", code)]


async def sse(client, body):
    events = []
    async with aconnect_sse(client, "POST", "/agent/stream", json=body) as source:
        assert source.response.status_code == 200
        async for s in source.aiter_sse():
            events.append(json.loads(s.data))
    return events


@pytest.mark.parametrize("script,code", [
    ({"tokens": 10, "error_after": 3}, "upstream_overloaded"),
    ({"tokens": 10, "error_after": 3, "error_type": "api_error"}, "upstream_unavailable"),
    ({"tokens": 10, "drop_after": 3}, "upstream_unavailable"),
    ({"tokens": 10, "ttft_ms": 3000}, "upstream_timeout"),
])
async def test_mid_stream_failures_end_with_an_error_event(server, upstream, script, code):
    upstream.script(script)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        events = await sse(client, {"message": "hello"})
        assert events[0]["type"] == "turn_start"
        assert events[-1]["type"] == "error" and events[-1]["code"] == code
        assert events[-1]["retryable"] is True
        texts = [e["text"] for e in events if e["type"] == "text_delta"]
        if "error_after" in script or "drop_after" in script:
            assert "".join(texts) == "tok0 tok1 tok2 "
        # Nothing retried after text was sent, nothing committed.
        assert len(upstream.requests()) == 1
        view = (await client.get(f"/sessions/{events[0]['session_id']}")).json()
        assert view["messages"] == [] and view["turn_records"][0]["status"] == "failed"
        # The session is usable again right away.
        upstream.script({"text": "fine now"})
        r = await client.post("/agent", json={"message": "again", "session_id": events[0]["session_id"]})
        assert r.json()["text"] == "fine now"
        assert len((await client.get(f"/sessions/{events[0]['session_id']}")).json()["messages"]) == 2


async def test_sdk_retries_overload_before_the_first_byte(start_server, upstream):
    server = start_server(ANTHROPIC_MAX_RETRIES=2)
    upstream.script({"status": 529, "retry_after_ms": 1, "times": 2}, {"text": "third time lucky"})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "hello"})
    assert r.status_code == 200 and r.json()["text"] == "third time lucky"
    assert [q["retry_count"] for q in upstream.requests()] == [0, 1, 2]


BAD_INPUTS = [
    (b"this is not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_request"),
    ({}, 400, "invalid_request"),
    ({"message": ""}, 400, "invalid_request"),
    ({"message": "   "}, 400, "invalid_request"),
    ({"message": 5}, 400, "invalid_request"),
    ({"message": []}, 400, "invalid_request"),
    ({"message": [{"type": "video"}]}, 400, "invalid_request"),
    ({"message": "x" * 1001}, 413, "message_too_long"),
    ({"message": "hi", "session_id": 5}, 400, "invalid_request"),
    ({"message": "hi", "session_id": "not a valid id!"}, 400, "invalid_session_id"),
    ({"message": "hi", "session_id": "A" * 22}, 404, "session_not_found"),
    ({"message": "hi", "model": "gpt-4o"}, 400, "model_not_allowed"),
    ({"message": "hi", "max_tokens": 0}, 400, "invalid_request"),
    ({"message": "hi", "max_tokens": "ten"}, 400, "invalid_request"),
    ({"message": "hi", "max_tokens": True}, 400, "invalid_request"),
    ({"message": "hi", "system": 3}, 400, "invalid_request"),
    ({"message": "hi", "on_busy": "queue"}, 400, "invalid_request"),
    ({"message": "hi", "message_id": "has spaces"}, 400, "invalid_request"),
    ({"message": "y" * 5000}, 413, "body_too_large"),
]


@pytest.mark.parametrize("path", ["/agent", "/agent/stream"])
async def test_bad_input_is_a_4xx_and_stores_nothing(server, upstream, redis_url, path):
    before = session_keys(redis_url)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for body, status, code in BAD_INPUTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = await client.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (body if len(content) < 200 else content[:40], r.text)
            error = r.json()["error"]
            assert error["code"] == code and isinstance(error["message"], str) and error["retryable"] is False
    assert upstream.requests() == []
    assert session_keys(redis_url) - before == set()


async def test_routing_errors_are_json(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.get("/agent")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        r = await client.get("/nowhere")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await client.get("/sessions/bad!id")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_session_id"
        r = await client.get("/sessions/" + "B" * 22)
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        r = await client.get("/sessions/" + "B" * 22 + "/stream")
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        r = await client.post("/sessions/" + "B" * 22 + "/cancel")
        assert r.status_code == 404
