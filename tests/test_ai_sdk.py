"""Vercel AI SDK `useChat`: `POST /api/chat`, `GET /api/chat/{id}/stream`, `WS /api/chat/ws`.

Two kinds of tests: the wire protocol checked from Python (exact headers, chunk order,
`[DONE]`, exactly the keys the `ai` package's chunk schemas define), and the real client —
the pinned `ai` package in tests/node driving our endpoints with `DefaultChatTransport`,
`WebSocketChatTransport`, the `Chat` class behind `useChat`, and `readUIMessageStream`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from .harness import Server, eventually, history_texts

NODE_DIR = Path(__file__).resolve().parent / "node"

# The chunk types we emit: (required keys, optional keys), from `uiMessageChunkSchema` of the
# pinned `ai` (tests/node/package.json). An unexpected key or a missing one fails the test.
CHUNK_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "start": ({"type"}, {"messageId", "messageMetadata"}),
    "start-step": ({"type"}, set()),
    "finish-step": ({"type"}, set()),
    "text-start": ({"type", "id"}, {"providerMetadata"}),
    "text-delta": ({"type", "id", "delta"}, {"providerMetadata"}),
    "text-end": ({"type", "id"}, {"citations", "providerMetadata"}),
    "tool-input-start": ({"type", "toolCallId", "toolName"},
                         {"inputEncoding", "providerExecuted", "providerMetadata", "toolMetadata", "dynamic",
                          "title"}),
    "tool-input-available": ({"type", "toolCallId", "toolName", "input"},
                             {"providerExecuted", "providerMetadata", "toolMetadata", "dynamic", "title"}),
    "tool-input-error": ({"type", "toolCallId", "toolName", "input", "errorText"},
                         {"providerExecuted", "providerMetadata", "toolMetadata", "dynamic", "title"}),
    "tool-output-available": ({"type", "toolCallId", "output"},
                              {"providerExecuted", "providerMetadata", "toolMetadata", "dynamic", "preliminary"}),
    "tool-output-error": ({"type", "toolCallId", "errorText"},
                          {"providerExecuted", "providerMetadata", "toolMetadata", "dynamic"}),
    "error": ({"type", "errorText"}, set()),
    "abort": ({"type"}, {"reason"}),
    "finish": ({"type"}, {"finishReason", "messageMetadata"}),
}
FINISH_REASONS = {"stop", "length", "content-filter", "tool-calls", "error", "interrupted", "other"}
UI_MESSAGE_STREAM_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
}


def chat_id() -> str:
    return secrets.token_urlsafe(12)  # 16 URL-safe characters: a valid session id


def user(text: str, mid: str | None = None) -> dict[str, Any]:
    return {"id": mid or secrets.token_hex(8), "role": "user", "parts": [{"type": "text", "text": text}]}


def chat_body(cid: str, *texts: str, **extra: Any) -> dict[str, Any]:
    return {"id": cid, "trigger": "submit-message", "messages": [user(t) for t in texts], **extra}


def check_chunk(chunk: dict[str, Any]) -> None:
    assert chunk["type"] in CHUNK_KEYS, chunk
    required, optional = CHUNK_KEYS[chunk["type"]]
    assert required <= chunk.keys() <= required | optional, chunk
    if chunk["type"] == "finish":
        assert chunk["finishReason"] in FINISH_REASONS


def parse_stream(raw: str) -> list[dict[str, Any]]:
    """A UI message stream body -> its chunks; checks the framing and the [DONE] end."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    chunks = []
    for frame in raw.split("\n\n")[:-2]:
        if frame.startswith(":"):
            continue  # keep-alive comment
        assert frame.startswith("data: ") and "\n" not in frame, frame  # no event:/id: lines
        chunk = json.loads(frame[6:])
        check_chunk(chunk)
        assert frame[6:] == json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)  # compact
        chunks.append(chunk)
    return chunks


def kinds(chunks: list[dict[str, Any]]) -> list[str]:
    """Chunk types, runs of text-delta collapsed to one."""
    out: list[str] = []
    for c in chunks:
        if not (c["type"] == "text-delta" and out and out[-1] == "text-delta"):
            out.append(c["type"])
    return out


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


async def post_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[httpx.Response, list[dict[str, Any]]]:
    r = await client.post("/api/chat", json=body)
    return r, (parse_stream(r.text) if r.status_code == 200 else [])


# -- the real client ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def node_client():
    """run(scenario) -> the result of tests/node/chat.mjs (see its header)."""
    node = shutil.which("node")
    if node is None:
        print("SKIP: `node` is not installed; the AI SDK client tests need Node.js 20+ (tests/node)")
        pytest.skip("`node` is not installed: the AI SDK client tests need Node.js 20+ (tests/node)")
    if not (NODE_DIR / "node_modules" / "ai").is_dir():
        npm = shutil.which("npm")
        assert npm, "node is installed but npm is not: cannot install tests/node"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600)

    async def run(scenario: dict[str, Any]) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            node, "chat.mjs", json.dumps(scenario), cwd=NODE_DIR,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, f"node exited {proc.returncode}: {err.decode()[-3000:]}"
        return json.loads(out)

    return run


def texts(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_use_chat_text_tool_call_error_and_recovery(shared_server: Server, upstream, node_client, transport):
    cid = chat_id()
    result = await node_client({"url": shared_server.url, "transport": transport, "chats": {"a": {"id": cid}}, "steps": [
        {"op": "send", "chat": "a", "text": "What is 2+2?"},
        {"op": "send", "chat": "a", "text": 'Go on #fake{"text":"one two three four","error_after":2}'},
        {"op": "send", "chat": "a", "text": "Hello again"},
    ]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None
    user1, answer1, user2, failed, user3, answer3 = chat["messages"]
    assert (user1["role"], user2["role"], user3["role"]) == ("user", "user", "user")

    # A calculator tool call with its output, then the second model call's text, in two steps.
    assert [p["type"] for p in answer1["parts"]] == ["step-start", "tool-calculator", "step-start", "text"]
    tool = answer1["parts"][1]
    assert tool["state"] == "output-available"
    assert tool["input"] == {"expression": "2+2"} and tool["output"] == "4"
    assert tool["toolCallId"].startswith("toolu_")
    assert answer1["parts"][3] == {"type": "text", "text": "The result is 4.", "state": "done"}
    meta = answer1["metadata"]
    assert meta["session_id"] == cid and meta["turn_id"] == answer1["id"] and meta["stop_reason"] == "end_turn"
    assert meta["usage"]["output_tokens"] > 0 and meta["estimated_cost_usd"] > 0

    # The upstream error mid-answer: partial text kept, the chat's error is our message only.
    assert texts(failed) == "one two "
    assert chat["errors"] == ["The model service is overloaded."]
    assert chat["finishes"][0] == {"isAbort": False, "isError": False, "isDisconnect": False,
                                   "finishReason": "stop", "messageId": answer1["id"]}
    assert chat["finishes"][1]["isError"] is True

    # The next message works; the failed turn left the server-side history unchanged.
    assert texts(answer3).endswith("You said: Hello again")
    sent = upstream.requests()[-1]["body"]["messages"]
    assert history_texts(sent)[0] == ("user", "What is 2+2?")
    assert history_texts(sent)[-1] == ("user", "Hello again")
    assert len(sent) == 5  # question, tool_use, tool_result, answer, the new message
    assert all("one two" not in json.dumps(m) for m in sent)
    if transport == "ws":
        assert result["sockets"] == 1


async def test_read_ui_message_stream_with_a_derived_session(shared_server: Server, upstream, node_client):
    """A chat id that is not a valid session id (too short) maps to a stable session."""
    cid = f"chat-{secrets.token_hex(3)}"
    result = await node_client({"url": shared_server.url, "transport": "http", "chats": {"a": {"id": cid}},
                                "steps": [{"op": "read", "chat": "a", "text": "first"},
                                          {"op": "read", "chat": "a", "text": "second"}]})
    first, second = result["reads"]
    assert first["errors"] == [] and second["errors"] == []
    assert texts(first["message"]).endswith("You said: first")
    session = first["message"]["metadata"]["session_id"]
    expected = base64.urlsafe_b64encode(hashlib.sha256(f"anonymous:{cid}".encode()).digest()).decode()[:22]
    assert session == expected == second["message"]["metadata"]["session_id"]
    assert kinds(first["chunks"]) == ["start", "start-step", "text-start", "text-delta", "text-end", "finish-step",
                                      "finish"]
    assert len(upstream.requests()[-1]["body"]["messages"]) == 3


async def test_tool_input_error_reaches_the_client(shared_server: Server, upstream, node_client):
    result = await node_client({"url": shared_server.url, "transport": "ws", "chats": {"a": {"id": chat_id()}},
                                "steps": [{"op": "send", "chat": "a",
                                           "text": '#fake{"tool_use":[{"name":"calculator","input":{}}]}'}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready", chat
    answer = chat["messages"][1]
    tool = answer["parts"][1]
    assert tool["type"] == "tool-calculator" and tool["state"] == "output-error"
    assert "invalid input for tool 'calculator'" in tool["errorText"]
    assert texts(answer).startswith("The tool failed: ")
    assert [c["type"] for c in chat["chunks"]][2:5] == ["tool-input-start", "tool-input-error", "tool-output-error"]


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_resume_a_running_turn(shared_server: Server, upstream, node_client, transport):
    cid = chat_id()
    # 3 s: the turn still runs when the node client (slow to start on a loaded box) resumes it.
    question = user('Count #fake{"tokens":100,"pace_ms":30}', "u1")
    full = " ".join(f"tok{i}" for i in range(100))
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        async with client.stream("POST", "/api/chat", json={"id": cid, "trigger": "submit-message",
                                                            "messages": [question]}) as r:
            assert r.status_code == 200
            turn_id = r.headers["x-turn-id"]
            seen = 0
            async for line in r.aiter_lines():
                seen += '"text-delta"' in line
                if seen == 3:
                    break  # the client goes away; the turn goes on
    # The page reloads: useChat({resume: true}) with the messages it had stored.
    result = await node_client({"url": shared_server.url, "transport": transport, "chats": {"a": {
        "id": cid, "messages": [question]}}, "steps": [{"op": "resume", "chat": "a"},
                                                       {"op": "reconnect", "chat": "a"}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None
    assert len(chat["messages"]) == 2
    answer = chat["messages"][1]
    assert answer["id"] == turn_id and texts(answer) == full
    assert chat["chunks"][0] == {"type": "start", "messageId": turn_id}  # replayed from its start
    assert chat["finishes"][0]["finishReason"] == "stop"
    again = result["reads"][0]
    if transport == "http":
        assert again is None  # finished: 204
    else:
        assert texts(again["message"]) == full  # the just-finished turn is replayed


async def test_websocket_stop_cancels_the_turn_and_keeps_the_partial_answer(shared_server: Server, upstream,
                                                                             node_client):
    cid = chat_id()
    result = await node_client({"url": shared_server.url, "transport": "ws", "chats": {"a": {"id": cid}}, "steps": [
        {"op": "stop", "chat": "a", "text": '#fake{"tokens":200,"pace_ms":20}', "afterChars": 20}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["finishes"][0]["isAbort"] is True
    shown = texts(chat["messages"][1])
    assert shown.startswith("tok0 tok1 ")
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        async def cancelled():
            view = (await client.get(f"/sessions/{cid}")).json()
            return view.get("turns") == 1 and view

        view = await eventually(cancelled, timeout=10)
        assert view, "the aborted turn was not committed"
        assert view["turn_records"][-1]["status"] == "cancelled"
        kept = view["messages"][-1]["content"][0]["text"]
        assert kept.startswith(shown) and len(kept.split()) < 200


async def test_http_stop_with_cancel_on_disconnect(shared_server: Server, upstream, node_client):
    cid = chat_id()
    result = await node_client({"url": shared_server.url, "transport": "http", "chats": {"a": {"id": cid}}, "steps": [
        {"op": "stop", "chat": "a", "text": '#fake{"tokens":200,"pace_ms":20}', "afterChars": 20,
         "body": {"cancel_on_disconnect": True}}]})
    assert result["chats"]["a"]["finishes"][0]["isAbort"] is True
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        async def committed():
            view = (await client.get(f"/sessions/{cid}")).json()
            return view.get("turns") == 1 and view

        view = await eventually(committed, timeout=10)
        assert view and view["turn_records"][-1]["status"] == "cancelled"


async def test_websocket_multiplexes_chats_on_one_socket(shared_server: Server, upstream, node_client):
    a, b = chat_id(), chat_id()
    result = await node_client({"url": shared_server.url, "transport": "ws",
                                "chats": {"a": {"id": a}, "b": {"id": b}}, "steps": [
        {"op": "parallel", "steps": [
            {"op": "send", "chat": "a", "text": 'Alpha #fake{"text":"alpha one two three","pace_ms":20}'},
            {"op": "send", "chat": "b", "text": 'Beta #fake{"text":"beta four five six","pace_ms":20}'}]},
        {"op": "send", "chat": "a", "text": "What is 6*7?"}]})
    assert result["sockets"] == 1
    ca, cb = result["chats"]["a"], result["chats"]["b"]
    assert texts(ca["messages"][1]) == "alpha one two three"
    assert texts(cb["messages"][1]) == "beta four five six"
    assert ca["messages"][3]["parts"][1]["output"] == "42"
    assert ca["messages"][1]["metadata"]["session_id"] == a and cb["messages"][1]["metadata"]["session_id"] == b


async def test_use_chat_with_an_api_key(start_server, upstream, node_client):
    """Browser-style auth: a header over HTTP; `["agent", "bearer.<key>"]` over WebSocket."""
    key = "test-key-" + secrets.token_hex(12)
    server = start_server(AGENT_API_KEYS=key)
    for transport in ("http", "ws"):
        cid = chat_id()
        result = await node_client({"url": server.url, "transport": transport, "key": key,
                                    "chats": {"a": {"id": cid}}, "steps": [
                                        {"op": "send", "chat": "a", "text": "What is 7-2?"},
                                        {"op": "resume", "chat": "a"}]})
        chat = result["chats"]["a"]
        assert chat["status"] == "ready" and chat["error"] is None, chat
        assert len(chat["messages"]) == 2  # a WebSocket resume replays the finished turn in place
        assert chat["messages"][1]["parts"][1]["output"] == "5"
        denied = await node_client({"url": server.url, "transport": transport, "key": "wrong-" + key,
                                    "chats": {"a": {"id": cid}}, "steps": [{"op": "send", "chat": "a", "text": "hi"}]})
        assert denied["chats"]["a"]["status"] == "error"
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        headers = {"authorization": f"Bearer {key}"}
        assert (await client.get(f"/sessions/{cid}", headers=headers)).json()["turns"] == 1


# -- the wire protocol, from Python ------------------------------------------------------------
def test_chunk_mapping_escapes_text_and_is_deterministic():
    from server import events as ev
    from server.transports.ai_sdk import UIChunks

    tricky = 'quote " back \\ new\nline </script> \u2028 é 🙂'
    log = [ev.encode("T", 1, "turn_start", {"session_id": "S", "turn_id": "T", "model": "m"}),
           ev.text_delta("T", 2, tricky),
           ev.encode("T", 3, "tool_call", {"tool_use_id": "tu", "name": "calculator"}),
           ev.encode("T", 4, "tool_input", {"tool_use_id": "tu", "name": "calculator", "input": {"x": 1},
                                            "valid": False, "error": "bad"}),
           ev.encode("T", 5, "tool_result", {"tool_use_id": "tu", "name": "calculator", "is_error": True,
                                             "error": "bad"}),
           ev.text_delta("T", 6, "after"),
           ev.encode("T", 7, "turn_end", {"stop_reason": "end_turn", "cancelled": False})]
    runs = []
    for _ in range(2):
        mapper = UIChunks("T")
        runs.append([c for e in log for c in mapper.feed(e)])
    assert runs[0] == runs[1]
    chunks = [json.loads(c) for c in runs[0]]
    for chunk in chunks:
        check_chunk(chunk)
    assert chunks[3] == {"type": "text-delta", "id": "text-1", "delta": tricky}
    assert [c["type"] for c in chunks] == [
        "start", "start-step", "text-start", "text-delta", "text-end", "tool-input-start", "tool-input-error",
        "tool-output-error", "finish-step", "start-step", "text-start", "text-delta", "text-end", "finish-step",
        "finish"]
    assert chunks[6]["errorText"] == "bad" and chunks[6]["input"] == {"x": 1}
    assert UIChunks("T").feed(log[-1])[0] == '{"type":"start","messageId":"T"}'


async def test_headers_chunk_order_and_done(shared_server: Server, upstream):
    cid = chat_id()
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r, chunks = await post_chat(client, chat_body(cid, "What is 2+2?"))
    assert r.status_code == 200
    for name, value in UI_MESSAGE_STREAM_HEADERS.items():
        assert r.headers[name] == value, name
    turn_id = r.headers["x-turn-id"]
    assert r.headers["x-session-id"] == cid
    assert kinds(chunks) == [
        "start", "start-step", "tool-input-start", "tool-input-available", "tool-output-available", "finish-step",
        "start-step", "text-start", "text-delta", "text-end", "finish-step", "finish"]
    assert chunks[0] == {"type": "start", "messageId": turn_id}
    call = chunks[2]["toolCallId"]
    assert chunks[2] == {"type": "tool-input-start", "toolCallId": call, "toolName": "calculator"}
    assert chunks[3] == {"type": "tool-input-available", "toolCallId": call, "toolName": "calculator",
                         "input": {"expression": "2+2"}}
    assert chunks[4] == {"type": "tool-output-available", "toolCallId": call, "output": "4"}
    assert text_of(chunks) == "The result is 4."
    assert {c["id"] for c in chunks if c["type"].startswith("text-")} == {"text-1"}
    finish = chunks[-1]
    assert finish["finishReason"] == "stop"
    assert finish["messageMetadata"]["session_id"] == cid and finish["messageMetadata"]["turn_id"] == turn_id


async def test_text_blocks_around_tool_calls_and_finish_reasons(shared_server: Server, upstream):
    upstream.script({"text": "Let me compute.", "tool_use": [{"name": "calculator", "input": {"expression": "1+1"}},
                                                             {"name": "calculator", "input": {"expression": "2*3"}}]},
                    {"text": "Two and six.", "stop_reason": "max_tokens"})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r, chunks = await post_chat(client, chat_body(chat_id(), "compute"))
    assert kinds(chunks) == [
        "start", "start-step", "text-start", "text-delta", "text-end",
        "tool-input-start", "tool-input-available", "tool-input-start", "tool-input-available",
        "tool-output-available", "tool-output-available", "finish-step",  # one step: both results first
        "start-step", "text-start", "text-delta", "text-end", "finish-step", "finish"]
    assert [c["id"] for c in chunks if c["type"] == "text-start"] == ["text-1", "text-2"]
    assert [c["output"] for c in chunks if c["type"] == "tool-output-available"] == ["2", "6"]
    assert chunks[-1]["finishReason"] == "length"


async def test_upstream_error_before_and_during_the_stream(shared_server: Server, upstream):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r, chunks = await post_chat(client, chat_body(chat_id(), '#fake{"status":529}'))
        assert r.status_code == 200
        assert chunks == [{"type": "start", "messageId": r.headers["x-turn-id"]},
                          {"type": "error", "errorText": "The model service is overloaded."},
                          {"type": "finish", "finishReason": "error"}]
        r, chunks = await post_chat(client, chat_body(chat_id(), '#fake{"text":"a b c d","error_after":2}'))
        assert kinds(chunks) == ["start", "start-step", "text-start", "text-delta", "text-end", "error", "finish"]
        assert text_of(chunks) == "a b "
        assert chunks[-2]["errorText"] == "The model service is overloaded."  # no upstream internals


async def test_cancel_ends_the_stream_with_abort(shared_server: Server, upstream):
    cid = chat_id()
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        async with client.stream("POST", "/api/chat",
                                 json=chat_body(cid, '#fake{"tokens":200,"pace_ms":20}')) as r:
            raw, cancelled = "", False
            async for part in r.aiter_text():
                raw += part
                if raw.count("text-delta") >= 3 and not cancelled:
                    cancelled = True
                    assert (await client.post(f"/sessions/{cid}/cancel")).status_code == 202
    chunks = parse_stream(raw)
    assert kinds(chunks)[-5:] == ["text-delta", "text-end", "finish-step", "abort", "finish"]
    assert chunks[-2] == {"type": "abort", "reason": "cancelled"}
    assert chunks[-1]["finishReason"] == "other"


async def test_history_is_server_side_and_ids_create_or_continue(shared_server: Server, upstream):
    cid = chat_id()
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        assert (await client.get(f"/sessions/{cid}")).status_code == 404
        r, chunks = await post_chat(client, chat_body(cid, "one"))
        assert r.status_code == 200 and r.headers["x-session-id"] == cid  # created with the chat's id
        # The client sends its whole (here: doctored) history; only the last user message counts.
        body = {"id": cid, "trigger": "submit-message", "messages": [
            user("not what I said"), {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "lies"}]},
            {"id": "m2", "role": "user", "parts": [{"type": "step-start"}, {"type": "text", "text": "two"},
                                                    {"type": "text", "text": "parts"}]}]}
        r, chunks = await post_chat(client, body)
        assert r.status_code == 200
        sent = upstream.requests()[-1]["body"]["messages"]
        assert history_texts(sent)[0] == ("user", "one")
        assert history_texts(sent)[2] == ("user", "twoparts")
        assert "lies" not in json.dumps(sent)
        view = (await client.get(f"/sessions/{cid}")).json()
        assert view["turns"] == 2 and len(view["messages"]) == 4
        # The same user message id again (a retried send) joins its turn instead of a new one.
        r, again = await post_chat(client, body)
        assert r.headers["x-turn-id"] == chunks[0]["messageId"]
        assert (await client.get(f"/sessions/{cid}")).json()["turns"] == 2


async def test_bad_requests(shared_server: Server, upstream):
    cid = chat_id()
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        cases = [
            (chat_body(cid, "hi", trigger="regenerate-message"), "invalid_request"),
            (chat_body(cid, "hi", messageId="m1"), "invalid_request"),
            ({"id": cid, "trigger": "submit-message", "messages": []}, "invalid_request"),
            ({"id": cid, "messages": [{"id": "a", "role": "assistant", "parts": [{"type": "text", "text": "x"}]}]},
             "invalid_request"),
            ({"id": cid, "messages": [{"id": "a", "role": "user", "parts": [{"type": "text", "text": "  "}]}]},
             "invalid_request"),
            ({"messages": [user("hi")]}, "invalid_request"),
            (chat_body(cid, "hi", model="gpt-4"), "model_not_allowed"),
        ]
        for body, code in cases:
            r = await client.post("/api/chat", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.text)
        r = await client.post("/api/chat", content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        assert (await client.get(f"/sessions/{cid}")).status_code == 404  # nothing was created


async def test_resume_is_204_when_idle(shared_server: Server, upstream):
    cid = chat_id()
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        assert (await client.get(f"/api/chat/{cid}/stream")).status_code == 204  # never used
        assert (await client.get("/api/chat/x/stream")).status_code == 204
        await post_chat(client, chat_body(cid, "hi"))
        assert (await client.get(f"/api/chat/{cid}/stream")).status_code == 204  # finished


async def test_websocket_frames_sequences_and_last_sequence(shared_server: Server, upstream):
    cid = chat_id()

    async def collect(ws, request_id: str) -> list[dict[str, Any]]:
        frames = []
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert frame["requestId"] == request_id, frame
            frames.append(frame)
            if frame["type"] in ("end", "error", "no-active"):
                return frames

    async with websockets.connect(f"{shared_server.ws_url}/api/chat/ws") as ws:
        await ws.send("not json")  # no requestId: nothing to answer, the socket stays usable
        await ws.send(json.dumps({"type": "dance", "requestId": "r0"}))
        assert json.loads(await ws.recv()) == {
            "type": "error", "requestId": "r0", "errorText": "Frame `type` must be one of: send, resume, abort."}
        await ws.send(json.dumps({"type": "send", "requestId": "r1", "id": cid, "trigger": "submit-message",
                                  "messages": [user("What is 5*5?")], "headers": {}, "body": {}}))
        frames = await collect(ws, "r1")
        assert frames[0] == {"type": "start", "requestId": "r1"} and frames[-1] == {"type": "end", "requestId": "r1"}
        chunks = frames[1:-1]
        assert [f["sequence"] for f in chunks] == list(range(len(chunks)))
        assert {f["type"] for f in chunks} == {"chunk"}
        for f in chunks:
            check_chunk(f["chunk"])
        assert text_of([f["chunk"] for f in chunks]) == "The result is 25."

        # Resume the just-finished turn after sequence 4: the same chunks, the same numbers.
        await ws.send(json.dumps({"type": "resume", "requestId": "r2", "id": cid, "lastSequence": 4,
                                  "headers": {}, "body": {}}))
        resumed = await collect(ws, "r2")
        assert resumed[0] == {"type": "start", "requestId": "r2"}
        assert [(f["sequence"], f["chunk"]) for f in resumed[1:-1]] == [(f["sequence"], f["chunk"])
                                                                         for f in chunks[5:]]
        await ws.send(json.dumps({"type": "resume", "requestId": "r3", "id": chat_id(), "headers": {}, "body": {}}))
        assert json.loads(await ws.recv()) == {"type": "no-active", "requestId": "r3"}
        await ws.send(json.dumps({"type": "send", "requestId": "r4", "id": cid, "trigger": "regenerate-message",
                                  "messages": [user("again")], "headers": {}, "body": {}}))
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["requestId"] == "r4" and "not supported" in error["errorText"]
        await ws.send(json.dumps({"type": "abort", "requestId": "unknown"}))  # ignored

        # Abort of a running send cancels its turn.
        await ws.send(json.dumps({"type": "send", "requestId": "r5", "id": cid, "trigger": "submit-message",
                                  "messages": [user('#fake{"tokens":200,"pace_ms":20}')], "headers": {}, "body": {}}))
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "chunk" and frame["chunk"]["type"] == "text-delta":
                break
        await ws.send(json.dumps({"type": "abort", "requestId": "r5"}))
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        async def cancelled():
            view = (await client.get(f"/sessions/{cid}")).json()
            return view["turns"] == 2 and view

        view = await eventually(cancelled, timeout=10)
        assert view and view["turn_records"][-1]["status"] == "cancelled"
