"""The AI SDK flows of tools that wait for the client: approval (`tool-approval-request`,
`addToolApprovalResponse`) and client tools (`onToolCall` + `addToolOutput`).

The chunk framing is checked from Python on hand-made turn logs (exactly the keys of the `ai`
package's chunk schemas); the flows with the real `ai` 7 client (tests/node/chat.mjs) over
`DefaultChatTransport` and `WebSocketChatTransport`, against real server processes, the
decision also coming to a different server process than the one running the turn.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from .harness import eventually
from .test_ai_sdk import CHUNK_KEYS, FINISH_REASONS, TurnLog, chat_id, collect, kinds, texts, user

# The chunks of this flow, from `uiMessageChunkSchema` of the pinned `ai` (tests/node/package.json).
TOOL_CHUNK_KEYS = {
    **CHUNK_KEYS,
    "tool-approval-request": ({"type", "approvalId", "toolCallId"},
                              {"approvalDescriptor", "inputSchemaInput", "reason", "isAutomatic", "signature"}),
    "tool-output-denied": ({"type", "toolCallId"}, set()),
}
CALC = {"expression": "2+2"}


def check(chunk: dict[str, Any]) -> None:
    assert chunk["type"] in TOOL_CHUNK_KEYS, chunk
    required, optional = TOOL_CHUNK_KEYS[chunk["type"]]
    assert required <= chunk.keys() <= required | optional, chunk
    if chunk["type"] == "finish":
        assert chunk["finishReason"] in FINISH_REASONS


def approval_log(*calls: tuple[str, str, str]) -> TurnLog:
    """A turn that says something, calls tools (id, name, "approval" | "client" | "run") and
    pauses for those that wait: the events the engine logs up to the pause."""
    log = TurnLog().text("Let me check.")
    for call_id, name, _kind in calls:
        log.add("tool_call", tool_use_id=call_id, name=name)
        log.add("tool_input", tool_use_id=call_id, name=name, input=CALC, valid=True)
    pending = [c for c, _n, kind in calls if kind != "run"]
    for call_id, name, kind in calls:
        request = {"tool_use_id": call_id, "name": name, "input": CALC, "timeout_s": 600, "pending": pending}
        if kind == "approval":
            log.add("tool_approval_request", approval_id=call_id, **request)
        elif kind == "client":
            log.add("client_tool_call", **request)
    return log


def run(log: list[Any], answered: tuple[str, ...] = (), batches: list[int] | None = None,
        ) -> tuple[list[dict[str, Any]], bool]:
    """What a stream of this turn sends: (its chunks, whether it ended at a pause), the log fed
    in batches (sizes; default one batch) as a sink feeds it. Twice: the same each time."""
    from server.transports.ai_sdk import UIChunks

    results = []
    for _ in range(2):
        framing, out, paused, i = UIChunks("T", answered), [], False, 0
        for size in batches or [len(log)]:
            batch = log[i:i + size]
            i += size
            out += [c for e in batch for c in framing.feed(e)]
            if not batch[-1].terminal and framing.paused_seq == batch[-1].seq:
                out += framing.pause_ending()
                paused = True
                break
        results.append((out, paused))
    assert results[0] == results[1], "deterministic"
    chunks = [json.loads(c) for c in results[0][0]]
    for raw, chunk in zip(results[0][0], chunks):
        check(chunk)
        assert raw == json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)
    return chunks, results[0][1]


def test_an_approval_request_ends_the_stream_as_the_ai_sdk_server_does():
    chunks, paused = run(approval_log(("tu1", "calculator", "approval")).events)
    assert paused
    assert kinds(chunks) == ["start", "start-step", "text-start", "text-delta", "text-end", "tool-input-start",
                             "tool-input-available", "tool-approval-request", "finish-step", "finish"]
    assert chunks[7] == {"type": "tool-approval-request", "approvalId": "tu1", "toolCallId": "tu1"}
    assert chunks[-1] == {"type": "finish", "finishReason": "tool-calls"}


def test_a_client_tool_call_is_its_input_then_the_pause():
    chunks, paused = run(approval_log(("tu1", "calculator", "run"), ("tu2", "get_location", "client")).events)
    assert paused
    assert kinds(chunks)[5:] == ["tool-input-start", "tool-input-available", "tool-input-start",
                                 "tool-input-available", "finish-step", "finish"]
    assert chunks[8] == {"type": "tool-input-available", "toolCallId": "tu2", "toolName": "get_location",
                         "input": CALC}


def test_the_stream_waits_until_every_call_of_the_pause_is_announced():
    log = approval_log(("a", "calculator", "approval"), ("b", "get_location", "client")).events
    chunks, paused = run(log, batches=[len(log) - 1, 1])  # the first batch ends between the two announcements
    assert paused and [c["type"] for c in chunks][-3:] == ["tool-approval-request", "finish-step", "finish"]
    _, paused_early = run(log[:-1])
    assert not paused_early, "one of the two calls is not announced yet: no pause"


def test_results_of_calls_that_do_not_wait_can_come_before_the_pause():
    """(The order useChat's sendAutomaticallyWhen helpers need when one model answer mixes a call
    that waits with one that does not: its output must be in the message before the pause.)"""
    log = TurnLog()
    for call_id in ("a", "b"):
        log.add("tool_call", tool_use_id=call_id, name="calculator")
        log.add("tool_input", tool_use_id=call_id, name="calculator", input=CALC, valid=True)
    log.add("tool_result", tool_use_id="b", name="calculator", is_error=False, output="4")
    log.add("tool_approval_request", tool_use_id="a", approval_id="a", name="calculator", input=CALC, timeout_s=600,
            pending=["a"])
    chunks, paused = run(log.events)
    assert paused and kinds(chunks)[-4:] == ["tool-output-available", "tool-approval-request", "finish-step",
                                             "finish"]
    log = answered(log, ("a", "calculator", True)).end()
    chunks, _ = run(log, answered=("a",))
    assert kinds(chunks)[:3] == ["start", "tool-output-available", "start-step"]


def answered(log: TurnLog, *decisions: tuple[str, str, bool]) -> TurnLog:
    """The events after the pause: decisions (id, name, approved), then every result, then the answer."""
    for call_id, _name, approved in decisions:
        log.add("tool_approval", tool_use_id=call_id, approved=approved, **({} if approved else {"reason": "no"}))
    for call_id, name, approved in decisions:
        if approved:
            log.add("tool_result", tool_use_id=call_id, name=name, is_error=False, output="4")
        else:
            log.add("tool_result", tool_use_id=call_id, name=name, is_error=True,
                    error="The user denied this tool call: no")
    return log.text("Done.")


def test_the_continuation_starts_after_the_answered_pause():
    log = answered(approval_log(("tu1", "calculator", "approval")), ("tu1", "calculator", True)).end()
    chunks, paused = run(log, answered=("tu1",))
    assert not paused
    assert kinds(chunks) == ["start", "tool-output-available", "start-step", "text-start", "text-delta", "text-end",
                             "finish-step", "finish"]
    assert chunks[0] == {"type": "start", "messageId": "T"}
    assert chunks[1] == {"type": "tool-output-available", "toolCallId": "tu1", "output": "4"}
    assert chunks[-1]["finishReason"] == "stop"

    # A replay of the whole turn (a resume after the answer): one message, the pause passed over.
    chunks, paused = run(log)
    assert not paused
    assert kinds(chunks) == ["start", "start-step", "text-start", "text-delta", "text-end", "tool-input-start",
                             "tool-input-available", "tool-approval-request", "tool-output-available", "finish-step",
                             "start-step", "text-start", "text-delta", "text-end", "finish-step", "finish"]


def test_a_denial_is_output_denied_not_an_error():
    log = answered(approval_log(("a", "calculator", "approval"), ("b", "calculator", "approval")),
                   ("a", "calculator", True), ("b", "calculator", False)).end()
    chunks, _ = run(log, answered=("a", "b"))
    assert kinds(chunks) == ["start", "tool-output-denied", "tool-output-available", "start-step", "text-start",
                             "text-delta", "text-end", "finish-step", "finish"]
    assert chunks[1] == {"type": "tool-output-denied", "toolCallId": "b"}
    assert not any(c["type"] == "tool-output-error" for c in chunks)


def test_a_client_tools_own_result_is_not_sent_back_to_it():
    log = approval_log(("c", "get_location", "client"))
    log.add("tool_result", tool_use_id="c", name="get_location", is_error=False, output='{"city":"Paris"}',
            client=True)
    log = log.text("You are in Paris.").end()
    chunks, _ = run(log, answered=("c",))
    assert kinds(chunks) == ["start", "start-step", "text-start", "text-delta", "text-end", "finish-step", "finish"]
    # Replayed whole (a resume), the result is part of the message.
    chunks, _ = run(log)
    assert {"type": "tool-output-available", "toolCallId": "c", "output": '{"city":"Paris"}'} in chunks


def test_a_later_pause_ends_the_continuation_and_an_earlier_one_is_passed():
    log = answered(approval_log(("a", "calculator", "approval")), ("a", "calculator", True))
    log.add("tool_call", tool_use_id="b", name="calculator")
    log.add("tool_input", tool_use_id="b", name="calculator", input=CALC, valid=True)
    log.add("tool_approval_request", tool_use_id="b", approval_id="b", name="calculator", input=CALC, timeout_s=600,
            pending=["b"])
    first, paused = run(log.events, answered=("a",))
    assert paused and kinds(first) == [
        "start", "tool-output-available", "start-step", "text-start", "text-delta", "text-end", "tool-input-start",
        "tool-input-available", "tool-approval-request", "finish-step", "finish"]
    log = answered(log, ("b", "calculator", False))
    log.events[-1:] = []  # (no text: the turn ends right after)
    second, paused = run(log.end(), answered=("b",))
    assert not paused
    assert kinds(second) == ["start", "tool-output-denied", "finish"]


def test_a_turn_cancelled_while_it_waits():
    log = approval_log(("a", "calculator", "approval")).end(cancelled=True, finish="cancelled")
    chunks, _ = run(log, answered=("a",))
    assert kinds(chunks) == ["start", "abort", "finish"]


def test_tool_answers_from_the_ui_message():
    from server.errors import ApiError
    from server.transports.ai_sdk import continued_message, tool_answers

    message = {"id": "T", "role": "assistant", "parts": [
        {"type": "step-start"},
        {"type": "text", "text": "Let me check.", "state": "done"},
        {"type": "tool-calculator", "toolCallId": "a", "state": "approval-responded", "input": CALC,
         "approval": {"id": "a", "approved": True}},
        {"type": "tool-calculator", "toolCallId": "b", "state": "approval-responded", "input": CALC,
         "approval": {"id": "b", "approved": False, "reason": "not now"}},
        {"type": "tool-get_location", "toolCallId": "c", "state": "output-available", "input": {}, "output": {"x": 1}},
        {"type": "dynamic-tool", "toolName": "d", "toolCallId": "d", "state": "output-error", "input": {},
         "errorText": "no GPS"},
        {"type": "tool-calculator", "toolCallId": "e", "state": "approval-requested", "input": CALC,
         "approval": {"id": "e"}},  # not decided yet
        {"type": "tool-calculator", "toolCallId": "f", "state": "output-available", "input": CALC, "output": "4"},
    ]}
    pending = {"a": "approval", "b": "approval", "c": "client", "d": "client", "e": "approval"}
    assert tool_answers(message, pending) == [
        {"tool_use_id": "a", "approved": True},
        {"tool_use_id": "b", "approved": False, "reason": "not now"},
        {"tool_use_id": "c", "output": {"x": 1}},
        {"tool_use_id": "d", "output": "no GPS", "is_error": True}]
    assert tool_answers(message, {}) == []
    assert tool_answers(message, {"a": "client"}) == [], "an approval part does not answer a client tool"
    bad = {"role": "assistant", "parts": [{"type": "tool-x", "toolCallId": "a", "state": "approval-responded",
                                           "approval": {"id": "a"}}]}
    with pytest.raises(ApiError) as refused:
        tool_answers(bad, {"a": "approval"})
    assert refused.value.code == "invalid_request"
    body = {"id": "c", "trigger": "submit-message", "messages": [user("hi"), message], "messageId": "T"}
    assert continued_message(body) is message
    assert continued_message({**body, "messages": [message, user("hi")]}) is None
    assert continued_message({**body, "trigger": "regenerate-message"}) is None


# -- the real client ------------------------------------------------------------------------
APPROVAL = {"TOOLS_REQUIRING_APPROVAL": "calculator"}
LOCATION_TOOL = {"name": "get_location", "description": "The user's city, from the browser.",
                 "input_schema": {"type": "object", "properties": {"precise": {"type": "boolean"}}}}


def tool_part(message: dict[str, Any], name: str = "calculator") -> dict[str, Any]:
    return next(p for p in message["parts"] if p["type"] == f"tool-{name}")


async def session_view(url: str, cid: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"{url}/sessions/{cid}")).json()


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_use_chat_approves_then_denies(start_server, upstream, node_client, transport):
    server = start_server(**APPROVAL)
    cid = chat_id()
    result = await node_client({"url": server.url, "transport": transport,
                                "chats": {"a": {"id": cid, "auto": "approvals"}}, "steps": [
        {"op": "send", "chat": "a", "text": "What is 2+2?"},
        {"op": "approve", "chat": "a", "approved": True},
        {"op": "send", "chat": "a", "text": "And 3*3?"},
        {"op": "approve", "chat": "a", "approved": False, "reason": "Not today"},
    ]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    q1, a1, q2, a2 = chat["messages"]
    assert (q1["role"], q2["role"]) == ("user", "user")

    # Approved: the same message goes on with the tool's output and the answer.
    tool = tool_part(a1)
    assert tool["state"] == "output-available" and tool["output"] == "4" and tool["input"] == CALC
    assert tool["approval"] == {"id": tool["toolCallId"], "approved": True}
    assert [p["type"] for p in a1["parts"]] == ["step-start", "tool-calculator", "step-start", "text"]
    assert texts(a1) == "The result is 4."
    assert a1["id"] == a1["metadata"]["turn_id"], "one turn, one message"

    # Denied: output-denied, and the model's answer to the denial.
    tool = tool_part(a2)
    assert tool["state"] == "output-denied"
    assert tool["approval"] == {"id": tool["toolCallId"], "approved": False, "reason": "Not today"}
    assert texts(a2) == "The tool failed: The user denied this tool call: Not today"

    # The requests: each continuation is the assistant message, by its id, with the decision.
    sent = result["requests"]
    assert [(r["trigger"], r["last"]["role"]) for r in sent] == [
        ("submit-message", "user"), ("submit-message", "assistant")] * 2
    assert sent[1]["messageId"] == a1["id"] == sent[1]["last"]["id"]
    assert tool_part(sent[1]["last"])["state"] == "approval-responded"

    # Each stream: the first ends at the approval request, the continuation starts after it.
    streams = split_streams(chat["chunks"])
    assert len(streams) == 4
    assert kinds(streams[0])[-4:] == ["tool-input-available", "tool-approval-request", "finish-step", "finish"]
    assert streams[0][-1]["finishReason"] == "tool-calls"
    assert kinds(streams[1]) == ["start", "tool-output-available", "start-step", "text-start", "text-delta",
                                 "text-end", "finish-step", "finish"]
    assert streams[1][0] == {"type": "start", "messageId": a1["id"]}
    assert kinds(streams[3])[:2] == ["start", "tool-output-denied"]
    for chunk in chat["chunks"]:
        check(chunk)
    assert [f["finishReason"] for f in chat["finishes"]] == ["tool-calls", "stop", "tool-calls", "stop"]

    # The server's history: the tool_use, its tool_result (the denial as an error), the answers.
    view = await session_view(server.url, cid)
    assert view["turns"] == 2
    results = [b for m in view["messages"] if m["role"] == "user" and isinstance(m["content"], list)
               for b in m["content"] if b.get("type") == "tool_result"]
    assert [r.get("is_error", False) for r in results] == [False, True]
    if transport == "ws":
        assert result["sockets"] == 1


def split_streams(chunks: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    streams: list[list[dict[str, Any]]] = []
    for chunk in chunks:
        if chunk["type"] == "start":
            streams.append([])
        streams[-1].append(chunk)
    return streams


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_use_chat_client_tool_with_add_tool_output(start_server, upstream, node_client, transport):
    server = start_server()
    cid = chat_id()
    upstream.script({"text": "Let me look.", "tool_use": [{"name": "get_location", "input": {"precise": True}}]},
                    {"text": "You are in Paris."})
    result = await node_client({"url": server.url, "transport": transport, "chats": {"a": {
        "id": cid, "auto": "toolCalls", "clientTools": {"get_location": {"output": {"city": "Paris"}}}}},
        "steps": [{"op": "send", "chat": "a", "text": "Where am I?", "body": {"client_tools": [LOCATION_TOOL]}}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    _question, answer = chat["messages"]
    tool = tool_part(answer, "get_location")
    assert tool["state"] == "output-available" and tool["output"] == {"city": "Paris"}
    assert tool["input"] == {"precise": True}
    assert texts(answer) == "Let me look.You are in Paris."
    assert [c["toolName"] for c in chat["toolCalls"]] == ["get_location"]
    assert [(r["trigger"], r["last"]["role"], r["messageId"]) for r in result["requests"]] == [
        ("submit-message", "user", None), ("submit-message", "assistant", answer["id"])]

    # What the model was given: the client tool's definition, then its result.
    first, second = upstream.requests()[-2]["body"], upstream.requests()[-1]["body"]
    assert any(t.get("name") == "get_location" and t["input_schema"] == LOCATION_TOOL["input_schema"]
               for t in first["tools"])
    result_block = second["messages"][-1]["content"][0]
    assert result_block["type"] == "tool_result" and result_block["tool_use_id"] == tool["toolCallId"]
    assert "Paris" in json.dumps(result_block["content"])


async def test_use_chat_client_tool_error(start_server, upstream, node_client):
    server = start_server()
    upstream.script({"tool_use": [{"name": "get_location", "input": {}}]})
    result = await node_client({"url": server.url, "transport": "http", "chats": {"a": {
        "id": chat_id(), "auto": "toolCalls", "clientTools": {"get_location": {"errorText": "No GPS here."}}}},
        "steps": [{"op": "send", "chat": "a", "text": "Where am I?", "body": {"client_tools": [LOCATION_TOOL]}}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    answer = chat["messages"][1]
    tool = tool_part(answer, "get_location")
    assert tool["state"] == "output-error" and tool["errorText"] == "No GPS here."
    assert texts(answer) == "The tool failed: No GPS here."
    sent = upstream.requests()[-1]["body"]["messages"][-1]["content"][0]
    assert sent["is_error"] is True


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_approval_decided_on_another_worker(start_server, upstream, node_client, transport):
    """The turn runs on one server process; the approval arrives at another one (same Redis),
    which hands it to the turn and streams the turn's continuation from the log."""
    env = {**APPROVAL, "HEARTBEAT_SECONDS": 2}
    a = start_server(name="worker-a", wait=False, **env)
    b = start_server(name="worker-b", wait=False, **env)
    a.wait_ready(), b.wait_ready()
    cid = chat_id()
    upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "6*7"}}]},
                    {"text": "It is 42.", "pace_ms": 20})
    result = await node_client({"url": a.url, "transport": transport,
                                "chats": {"a": {"id": cid, "auto": "approvals"}}, "steps": [
        {"op": "send", "chat": "a", "text": "What is 6*7?"},
        {"op": "use", "url": b.url},
        {"op": "approve", "chat": "a", "approved": True}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    answer = chat["messages"][1]
    assert tool_part(answer)["output"] == "42" and texts(answer) == "It is 42."
    streams = split_streams(chat["chunks"])
    assert kinds(streams[1]) == ["start", "tool-output-available", "start-step", "text-start", "text-delta",
                                 "text-end", "finish-step", "finish"]
    assert streams[1][-1]["messageMetadata"]["turn_id"] == answer["id"]
    view = await session_view(b.url, cid)
    assert view["turns"] == 1 and view["running_turn_id"] is None


async def test_continuation_requests_from_python(start_server, upstream):
    """The wire: POST /api/chat with the assistant message answers it; nothing pending is 409."""
    server = start_server(**APPROVAL)
    cid = chat_id()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.post("/api/chat", json={"id": cid, "trigger": "submit-message",
                                                 "messages": [user("What is 2+2?")]})
        first = parse_stream_tools(r.text)
        assert r.status_code == 200 and first[-1] == {"type": "finish", "finishReason": "tool-calls"}
        turn_id = first[0]["messageId"]
        call = next(c for c in first if c["type"] == "tool-approval-request")
        view = await session_view(server.url, cid)
        assert view["running_turn_id"] == turn_id, "the turn waits, holding the session"

        message = {"id": turn_id, "role": "assistant", "parts": [
            {"type": "step-start"},
            {"type": "tool-calculator", "toolCallId": call["toolCallId"], "state": "approval-responded",
             "input": CALC, "approval": {"id": call["approvalId"], "approved": True}}]}
        body = {"id": cid, "trigger": "submit-message", "messageId": turn_id,
                "messages": [user("What is 2+2?"), message]}
        r = await client.post("/api/chat", json=body)
        assert r.status_code == 200 and r.headers["x-turn-id"] == turn_id
        rest = parse_stream_tools(r.text)
        assert rest[0] == {"type": "start", "messageId": turn_id}
        assert rest[1] == {"type": "tool-output-available", "toolCallId": call["toolCallId"], "output": "4"}
        assert rest[-1]["finishReason"] == "stop"

        # The same answer again: the call is no longer pending.
        r = await client.post("/api/chat", json=body)
        assert r.status_code == 409 and r.json()["error"]["code"] == "tool_call_not_pending"
        # An assistant message on a chat never used: nothing pending either.
        r = await client.post("/api/chat", json={**body, "id": chat_id()})
        assert r.status_code == 409 and r.json()["error"]["code"] == "tool_call_not_pending"

        # A resume while the turn waits: the turn replayed up to the pause, then the end.
        r = await client.post("/api/chat", json={"id": cid, "messages": [user("And 5+5?")]})
        paused = parse_stream_tools(r.text)
        resumed = await client.get(f"/api/chat/{cid}/stream")
        assert resumed.status_code == 200
        assert parse_stream_tools(resumed.text) == paused

        # The HTTP endpoint decides it instead; the chat's stream is the continuation.
        call = next(c for c in paused if c["type"] == "tool-approval-request")["toolCallId"]
        r = await client.post(f"/sessions/{cid}/tool-approvals", json={"tool_use_id": call, "approved": False})
        assert r.status_code == 202

        async def done():
            return (await session_view(server.url, cid))["running_turn_id"] is None

        assert await eventually(done, timeout=10)
        # (finished: a resume is 204, as for any finished turn)
        assert (await client.get(f"/api/chat/{cid}/stream")).status_code == 204


def parse_stream_tools(raw: str) -> list[dict[str, Any]]:
    """A UI message stream body -> its chunks (as tests/test_ai_sdk.py's parse_stream, with this
    flow's chunks): `data:` frames only, compact JSON, `[DONE]` last."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    chunks = []
    for frame in raw.split("\n\n")[:-2]:
        if frame.startswith(":"):
            continue  # keep-alive comment
        assert frame.startswith("data: ") and "\n" not in frame, frame
        chunk = json.loads(frame[6:])
        check(chunk)
        assert frame[6:] == json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)
        chunks.append(chunk)
    return chunks


async def test_websocket_frames_at_a_pause_resume_and_continuation(start_server, upstream):
    """/api/chat/ws: a send ends (`end`) at the pause; a resume replays up to it; the send that
    answers it streams the continuation, numbered from 0."""
    import websockets

    server = start_server(**APPROVAL)
    cid = chat_id()

    def chunks_of(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert frames[0]["type"] == "start" and frames[-1]["type"] == "end", frames
        assert [f["sequence"] for f in frames[1:-1]] == list(range(len(frames) - 2))
        for f in frames[1:-1]:
            check(f["chunk"])
        return [f["chunk"] for f in frames[1:-1]]

    async with websockets.connect(f"{server.ws_url}/api/chat/ws") as ws:
        question = user("What is 4*4?")
        await ws.send(json.dumps({"type": "send", "requestId": "r1", "id": cid, "trigger": "submit-message",
                                  "messages": [question], "body": {}}))
        first = chunks_of(await collect(ws, "r1"))
        assert first[-1] == {"type": "finish", "finishReason": "tool-calls"}
        call = next(c for c in first if c["type"] == "tool-approval-request")
        await ws.send(json.dumps({"type": "resume", "requestId": "r2", "id": cid}))
        assert chunks_of(await collect(ws, "r2")) == first, "a resume while it waits: the same, up to the pause"

        turn_id = first[0]["messageId"]
        message = {"id": turn_id, "role": "assistant", "parts": [
            {"type": "step-start"},
            {"type": "tool-calculator", "toolCallId": call["toolCallId"], "state": "approval-responded",
             "input": {"expression": "4*4"}, "approval": {"id": call["approvalId"], "approved": True}}]}
        await ws.send(json.dumps({"type": "send", "requestId": "r3", "id": cid, "trigger": "submit-message",
                                  "messageId": turn_id, "messages": [question, message], "body": {}}))
        rest = chunks_of(await collect(ws, "r3"))
        assert rest[0] == {"type": "start", "messageId": turn_id}
        assert rest[1] == {"type": "tool-output-available", "toolCallId": call["toolCallId"], "output": "16"}
        assert rest[-1]["finishReason"] == "stop"
        await ws.send(json.dumps({"type": "send", "requestId": "r4", "id": cid, "trigger": "submit-message",
                                  "messageId": turn_id, "messages": [question, message], "body": {}}))
        error = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert error["type"] == "error" and error["requestId"] == "r4" and "waits for an answer" in error["errorText"]


async def test_use_chat_approves_a_call_that_came_with_one_needing_nobody(start_server, upstream, node_client):
    """One model answer calls a tool that needs approval and one that does not: the second runs
    before the pause, so the client's last step is complete once it decides, and useChat sends."""
    server = start_server(**APPROVAL)
    upstream.script({"tool_use": [{"name": "current_time", "input": {}, "id": "toolu_time"},
                                  {"name": "calculator", "input": CALC, "id": "toolu_calc"}]})
    result = await node_client({"url": server.url, "transport": "http",
                              "chats": {"a": {"id": chat_id(), "auto": "approvals"}}, "steps": [
        {"op": "send", "chat": "a", "text": "Time, and 2+2?"},
        {"op": "approve", "chat": "a", "approved": True},
    ]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    answer = chat["messages"][-1]
    assert tool_part(answer, "current_time")["state"] == "output-available"
    assert tool_part(answer)["state"] == "output-available" and tool_part(answer)["output"] == "4"
    first, second = split_streams(chat["chunks"])
    assert kinds(first)[-4:] == ["tool-output-available", "tool-approval-request", "finish-step", "finish"]
    assert kinds(second)[:2] == ["start", "tool-output-available"]
    # The model got both results, in call order.
    results = upstream.requests()[1]["body"]["messages"][-1]["content"]
    assert [b["tool_use_id"] for b in results] == ["toolu_time", "toolu_calc"]
