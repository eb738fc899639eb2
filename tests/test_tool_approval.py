"""Human approval of tool calls and tools the client runs: the turn announces the calls, waits on
the server (keeping its lock, heartbeats flowing), and goes on when an answer arrives from any
worker: an HTTP endpoint or a WebSocket frame. Two server processes share one Redis (or Cluster)."""

from __future__ import annotations

import base64
import json
import secrets

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse

from server.config import Settings
from server.errors import ApiError
from server.requests import parse_tool_answer

from .conftest import BOTH_STORES
from .harness import eventually

CALC = "calculator"
PICK = {"name": "pick_color", "description": "Ask the user to pick a colour.",
        "input_schema": {"type": "object", "properties": {"palette": {"type": "array", "items": {"type": "string"}}},
                         "required": ["palette"], "additionalProperties": False}}


@pytest.fixture
def pair(start_server):
    """Two servers on one Redis; calculator calls need approval."""
    env = {"TOOLS_REQUIRING_APPROVAL": CALC, "HEARTBEAT_SECONDS": 0.3}
    a, b = start_server(name="approve-a", wait=False, **env), start_server(name="approve-b", wait=False, **env)
    return a.wait_ready(), b.wait_ready()


async def stream_until(source, stop):
    """Events of an open SSE stream until `stop(event)` (inclusive); call again to read on."""
    if not hasattr(source, "events"):
        source.events = source.aiter_sse()
    events = []
    async for s in source.events:
        events.append(json.loads(s.data))
        if stop(events[-1]):
            return events
    return events


def tool_results(request):
    return [{k: v for k, v in b.items() if k != "cache_control"}
            for b in request["body"]["messages"][-1]["content"] if b.get("type") == "tool_result"]


@BOTH_STORES
async def test_approval_decided_on_the_other_server_runs_the_tool(pair, upstream):
    a, b = pair
    upstream.script({"tool_use": [{"name": CALC, "input": {"expression": "6*7"}, "id": "toolu_ok"}]})
    async with httpx.AsyncClient(timeout=30) as client:
        async with aconnect_sse(client, "POST", a.url + "/agent/stream", json={"message": "6*7?"}) as source:
            assert source.response.status_code == 200
            sid = source.response.headers["x-session-id"]
            first = await stream_until(source, lambda e: e["type"] == "tool_approval_request")
            request = first[-1]
            assert request == {**request, "tool_use_id": "toolu_ok", "approval_id": "toolu_ok", "name": CALC,
                               "input": {"expression": "6*7"}, "pending": ["toolu_ok"]}
            # The turn waits on A; the decision goes to B.
            pending = (await client.post(b.url + f"/sessions/{sid}/tool-approvals",
                                         json={"tool_use_id": "toolu_ok", "approved": True}))
            assert pending.status_code == 202, pending.text
            assert pending.json()["turn_id"] == source.response.headers["x-turn-id"]
            rest = await stream_until(source, lambda e: e["type"] in ("turn_end", "error"))
    kinds = [e["type"] for e in rest]
    assert kinds[:2] == ["tool_approval", "tool_result"], kinds
    assert rest[0] == {**rest[0], "tool_use_id": "toolu_ok", "approved": True}
    assert rest[1]["output"] == "42" and rest[-1]["text"] == "The result is 42."
    assert tool_results(upstream.requests()[1]) == [{"type": "tool_result", "tool_use_id": "toolu_ok", "content": "42"}]
    # Answered once: a second decision is refused.
    async with httpx.AsyncClient(timeout=30) as client:
        again = await client.post(a.url + f"/sessions/{sid}/tool-approvals",
                                  json={"tool_use_id": "toolu_ok", "approved": False})
    assert again.status_code == 409 and again.json()["error"]["code"] == "tool_call_not_pending"


async def test_denial_reaches_the_model_and_the_tool_does_not_run(pair, upstream):
    a, b = pair
    upstream.script({"tool_use": [{"name": CALC, "input": {"expression": "1/0"}, "id": "toolu_no"}]})
    async with httpx.AsyncClient(timeout=30) as client:
        async with aconnect_sse(client, "POST", a.url + "/agent/stream", json={"message": "1/0?"}) as source:
            sid = source.response.headers["x-session-id"]
            await stream_until(source, lambda e: e["type"] == "tool_approval_request")
            denied = await client.post(b.url + f"/sessions/{sid}/tool-approvals",
                                       json={"tool_use_id": "toolu_no", "approved": False, "reason": "not today"})
            assert denied.status_code == 202
            rest = await stream_until(source, lambda e: e["type"] in ("turn_end", "error"))
    assert rest[0] == {**rest[0], "type": "tool_approval", "approved": False, "reason": "not today"}
    assert rest[1]["is_error"] is True and rest[1]["error"] == "The user denied this tool call: not today"
    assert tool_results(upstream.requests()[1]) == [{"type": "tool_result", "tool_use_id": "toolu_no", "is_error": True,
                                                      "content": "The user denied this tool call: not today"}]
    assert rest[-1]["type"] == "turn_end" and rest[-1]["text"].startswith("The tool failed")


async def test_waiting_keeps_the_turn_alive_and_times_out_as_denied(start_server, upstream):
    server = start_server(TOOLS_REQUIRING_APPROVAL=CALC, TOOL_APPROVAL_TIMEOUT_SECONDS=1.5,
                          HEARTBEAT_SECONDS=0.2, TURN_LOCK_TTL_SECONDS=1)
    upstream.script({"tool_use": [{"name": CALC, "input": {"expression": "2+2"}, "id": "toolu_late"}]})
    lines = []
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", server.url + "/agent/stream", json={"message": "2+2?"}) as response:
            sid = response.headers["x-session-id"]
            async for line in response.aiter_lines():
                lines.append(line)
        late = await client.post(server.url + f"/sessions/{sid}/tool-approvals",
                                 json={"tool_use_id": "toolu_late", "approved": True})
        session = (await client.get(server.url + f"/sessions/{sid}")).json()
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    waited = lines[[i for i, line in enumerate(lines) if "tool_approval_request" in line][0]:
                   [i for i, line in enumerate(lines) if '"tool_approval"' in line][0]]
    # Heartbeats flowed while it waited (every 0.2 s for 1.5 s), and its 1 s lock was renewed.
    assert sum(line == ": keep-alive" for line in waited) >= 3
    assert kinds[kinds.index("tool_approval_request") + 1:][:2] == ["tool_approval", "tool_result"]
    decision = events[kinds.index("tool_approval")]
    assert decision["approved"] is False and decision["timed_out"] is True
    assert events[-1]["type"] == "turn_end"
    assert tool_results(upstream.requests()[1])[0]["content"] == "Not approved within 1.5 s: not run."
    assert late.status_code == 409 and late.json()["error"]["code"] == "tool_call_not_pending"
    assert session["running_turn_id"] is None and session["turns"] == 1


async def test_only_the_owner_decides_and_bad_decisions_are_4xx(start_server, upstream):
    k1, k2 = "sk-" + secrets.token_hex(16), "sk-" + secrets.token_hex(16)
    server = start_server(AGENT_API_KEYS=f"{k1},{k2}", RATE_LIMIT_RPM=0, RATE_LIMIT_TPM=0,
                          MAX_CONCURRENT_STREAMS_PER_PRINCIPAL=0, TOOLS_REQUIRING_APPROVAL=CALC)
    owner, other = {"authorization": f"Bearer {k1}"}, {"authorization": f"Bearer {k2}"}
    upstream.script({"tool_use": [{"name": CALC, "input": {"expression": "3*3"}, "id": "toolu_mine"}]})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        waiting = await client.post("/agent", headers=owner, json={"message": "3*3?"})
        assert waiting.status_code == 202, waiting.text
        body = waiting.json()
        sid = body["session_id"]
        assert body["status"] == "waiting_for_tools"
        assert body["pending"] == [{"tool_use_id": "toolu_mine", "name": CALC, "input": {"expression": "3*3"},
                                    "kind": "approval", "timeout_s": 600.0}]
        url = f"/sessions/{sid}/tool-approvals"
        answers = {
            "stranger": await client.post(url, headers=other, json={"tool_use_id": "toolu_mine", "approved": True}),
            "unknown call": await client.post(url, headers=owner, json={"tool_use_id": "toolu_other", "approved": True}),
            "not a bool": await client.post(url, headers=owner, json={"tool_use_id": "toolu_mine", "approved": "yes"}),
            "result for an approval": await client.post(f"/sessions/{sid}/tool-results", headers=owner,
                                                        json={"tool_use_id": "toolu_mine", "output": "9"}),
            "extra field": await client.post(url, headers=owner, json={"tool_use_id": "toolu_mine", "approved": True,
                                                                       "output": "9"}),
            "bad session": await client.post("/sessions/x/tool-approvals", headers=owner,
                                             json={"tool_use_id": "toolu_mine", "approved": True}),
        }
        codes = {name: (r.status_code, r.json()["error"]["code"]) for name, r in answers.items()}
        assert codes == {"stranger": (404, "session_not_found"), "unknown call": (409, "tool_call_not_pending"),
                         "not a bool": (400, "invalid_request"), "result for an approval": (400, "invalid_request"),
                         "extra field": (400, "invalid_request"), "bad session": (400, "invalid_session_id")}
        # None of that decided anything: the owner still can.
        ok = await client.post(url, headers=owner, json={"tool_use_id": "toolu_mine", "approved": True})
        assert ok.status_code == 202
        async with aconnect_sse(client, "GET", f"/sessions/{sid}/stream", headers=owner) as source:
            events = [json.loads(s.data) async for s in source.aiter_sse()]
    assert events[-1]["type"] == "turn_end" and events[-1]["text"] == "The result is 9."


@BOTH_STORES
async def test_client_tool_over_websocket_answered_from_the_other_server(pair, upstream):
    a, b = pair
    upstream.script({"tool_use": [{"name": "pick_color", "input": {"palette": ["red", "teal"]}, "id": "toolu_pick"}]},
                    {"text": "You picked teal."})
    async with websockets.connect(f"{a.ws_url}/agent/ws") as ws_a:
        await ws_a.send(json.dumps({"type": "message", "message": "pick one", "client_tools": [PICK]}))
        events = []
        while not events or events[-1]["type"] != "client_tool_call":
            e = json.loads(await ws_a.recv())
            if e["type"] != "ping":
                events.append(e)
        call = events[-1]
        assert call == {**call, "tool_use_id": "toolu_pick", "name": "pick_color", "input": {"palette": ["red", "teal"]},
                        "pending": ["toolu_pick"]}
        sid = events[0]["session_id"]
        async with websockets.connect(f"{b.ws_url}/agent/ws?session_id={sid}") as ws_b:
            await ws_b.send(json.dumps({"type": "tool_result", "tool_use_id": "toolu_nope", "output": "x"}))
            refused = json.loads(await ws_b.recv())
            assert refused["type"] == "error" and refused["code"] == "tool_call_not_pending"
            await ws_b.send(json.dumps({"type": "tool_result", "tool_use_id": "toolu_pick", "output": {"color": "teal"}}))
            while events[-1]["type"] not in ("turn_end", "error"):
                e = json.loads(await ws_a.recv())
                if e["type"] != "ping":
                    events.append(e)
    result = next(e for e in events if e["type"] == "tool_result")
    assert result == {**result, "tool_use_id": "toolu_pick", "client": True, "is_error": False,
                      "output": '{"color": "teal"}'}
    assert events[-1]["text"] == "You picked teal."
    first, second = upstream.requests()
    # The client's tool was offered to the model after the server's, the cache breakpoint on it.
    assert [t["name"] for t in first["body"]["tools"]] == [CALC, "current_time", "pick_color"]
    assert first["body"]["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert first["body"]["tools"][-1]["input_schema"] == PICK["input_schema"]
    assert tool_results(second) == [{"type": "tool_result", "tool_use_id": "toolu_pick", "content": '{"color": "teal"}'}]


async def test_client_tool_input_that_breaks_its_schema_is_played_back_without_asking(shared_server, upstream):
    server = shared_server
    upstream.script({"tool_use": [{"name": "pick_color", "input": {"palette": "red"}, "id": "toolu_bad"}]},
                    {"text": "Sorry."})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        answer = await client.post("/agent", json={"message": "pick", "client_tools": [PICK]})
    assert answer.status_code == 200, answer.text
    (call,) = answer.json()["tool_calls"]
    assert call["is_error"] is True and "is not of type 'array'" in call["error"]
    assert "is not of type 'array'" in tool_results(upstream.requests()[1])[0]["content"]


async def test_cancel_while_waiting_ends_the_turn_with_a_valid_history(start_server, upstream):
    server = start_server()
    upstream.script({"text": "Let me ask.", "tool_use": [{"name": "pick_color", "input": {"palette": ["a"]},
                                                          "id": "toolu_c"}]}, {"text": "next answer"})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        waiting = (await client.post("/agent", json={"message": "pick", "client_tools": [PICK]})).json()
        sid = waiting["session_id"]
        cancelled = await client.post(f"/sessions/{sid}/cancel")
        assert cancelled.json()["cancelled_turn_id"] == waiting["turn_id"]
        await eventually(lambda: True)
        late = await client.post(f"/sessions/{sid}/tool-results", json={"tool_use_id": "toolu_c", "output": "a"})
        again = await client.post("/agent", json={"message": "hello", "session_id": sid})
        session = (await client.get(f"/sessions/{sid}")).json()
    assert late.status_code == 409
    assert again.status_code == 200 and again.json()["text"] == "next answer"
    roles = [m["role"] for m in session["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert session["messages"][1]["content"] == [{"type": "text", "text": "Let me ask."}]


@pytest.mark.parametrize("tools, message", [
    ("nope", "`client_tools` must be a list"),
    ([{"name": "bad name", "input_schema": {"type": "object"}}], "`client_tools[0].name`"),
    ([{"name": "x", "input_schema": {"type": "string"}}], "`client_tools[0].input_schema` must be a JSON Schema"),
    ([{"name": "x", "input_schema": {"type": "object", "properties": {"a": {"pattern": "(a)\\1"}}}}], "RE2"),
    ([{"name": "x", "input_schema": {"type": "object"}, "run": "rm -rf"}], "`client_tools[0]` must be an object"),
    ([{"name": CALC, "input_schema": {"type": "object"}}], "calculator is the name of a tool of this server"),
])
async def test_bad_client_tools_are_400(shared_server, upstream, tools, message):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        answer = await client.post("/agent", json={"message": "hi", "client_tools": tools})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == "client_tools" and message in error["message"]
    assert upstream.requests() == []


PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


@pytest.mark.parametrize("answer, stored", [
    ({"tool_use_id": "toolu_1", "approved": True}, ("approval", {"approved": True, "reason": None})),
    ({"tool_use_id": "toolu_1", "approved": False, "reason": "no"}, ("approval", {"approved": False, "reason": "no"})),
    ({"tool_use_id": "toolu_1", "output": "text"}, ("client", {"output": "text", "is_error": False})),
    ({"tool_use_id": "toolu_1", "output": {"a": [1]}, "is_error": True},
     ("client", {"output": '{"a": [1]}', "is_error": True})),
    ({"tool_use_id": "toolu_1", "output": [{"type": "text", "text": "see"},
                                           {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                        "data": PNG}}]},
     ("client", {"output": [{"type": "text", "text": "see"}, {"type": "image", "source": {
         "type": "base64", "media_type": "image/png", "data": PNG}}], "is_error": False})),
])
def test_tool_answers_are_kept_as_the_model_will_read_them(answer, stored):
    call_id, kind, data = parse_tool_answer(answer, Settings.from_env({}))
    assert (call_id, kind, json.loads(data)) == ("toolu_1", *stored)


@pytest.mark.parametrize("answer, code, field", [
    ({"tool_use_id": "toolu 1", "approved": True}, "invalid_request", "tool_use_id"),
    ({"tool_use_id": "toolu_1"}, "invalid_request", None),
    ({"tool_use_id": "toolu_1", "approved": True, "reason": "x" * 2001}, "invalid_request", "reason"),
    ({"tool_use_id": "toolu_1", "output": "x", "is_error": "yes"}, "invalid_request", "is_error"),
    ({"tool_use_id": "toolu_1", "output": [{"type": "text", "text": 3}]}, "invalid_request", "output"),
    ({"tool_use_id": "toolu_1", "output": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                          "data": "bm90IGEgcG5n"}}]},
     "invalid_image", None),
    ({"tool_use_id": "toolu_1", "output": "x" * 100_001}, "message_too_long", "output"),
    ({"tool_use_id": "toolu_1", "output": "\ud800"}, "invalid_request", "output"),
])
def test_bad_tool_answers_are_400_naming_the_field(answer, code, field):
    with pytest.raises(ApiError) as caught:
        parse_tool_answer(answer, Settings.from_env({}))
    assert caught.value.code == code and caught.value.extra.get("field") == field, caught.value.payload()
