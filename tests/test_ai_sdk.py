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
from typing import Any

import httpx
import pytest
import websockets

from .harness import Server, chat_and_leave, eventually, history_texts


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
    "reasoning-start": ({"type", "id"}, {"providerMetadata"}),
    "reasoning-delta": ({"type", "id", "delta"}, {"providerMetadata"}),
    "reasoning-end": ({"type", "id"}, {"providerMetadata"}),
    "source-url": ({"type", "sourceId", "url"}, {"title", "providerMetadata"}),
    "source-document": ({"type", "sourceId", "mediaType", "title"}, {"filename", "providerMetadata"}),
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


PDF = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
       b"2 0 obj << /Type /Pages /Kids [3 0 R] /Count 1 >> endobj\n3 0 obj << /Type /Page /Parent 2 0 R >> endobj\n"
       b"trailer << /Root 1 0 R >>\n%%EOF\n")
PDF_URL = "data:application/pdf;base64," + base64.b64encode(PDF).decode()
NOTES = "Meeting notes: ünïcode ✓\nline two"
NOTES_URL = "data:text/plain;base64," + base64.b64encode(NOTES.encode()).decode()


def file_part(media_type: str, url: str, filename: str | None = None) -> dict[str, Any]:
    part = {"type": "file", "mediaType": media_type, "url": url}
    return part | ({"filename": filename} if filename else {})


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
    """Chunk types, runs of text-delta (or reasoning-delta) collapsed to one."""
    out: list[str] = []
    for c in chunks:
        if not (c["type"] in ("text-delta", "reasoning-delta") and out and out[-1] == c["type"]):
            out.append(c["type"])
    return out


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


async def post_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[httpx.Response, list[dict[str, Any]]]:
    r = await client.post("/api/chat", json=body)
    return r, (parse_stream(r.text) if r.status_code == 200 else [])


# -- the real client ------------------------------------------------------------------------
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
    async with httpx.AsyncClient(timeout=30) as client:
        turn_id = await chat_and_leave(client, shared_server.url, cid, question)  # (the turn goes on)
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


THOUGHT = "The user asks about Paris. I should search the web first."
WIKI = "https://en.example.org/wiki/Paris"
TRAVEL = "https://travel.example.com/paris"
SEARCH_RESULTS = [
    {"type": "web_search_result", "url": WIKI, "title": "Paris - Encyclopedia", "encrypted_content": "EqwBCioIAhgC",
     "page_age": "2 days ago"},
    {"type": "web_search_result", "url": TRAVEL, "title": "Visit Paris", "encrypted_content": "EqwBCioIAhgD",
     "page_age": None}]


def cite(url: str, title: str, text: str) -> dict[str, Any]:
    return {"type": "web_search_result_location", "url": url, "title": title, "cited_text": text,
            "encrypted_index": "Eo8BCioIAhgB"}


def searched_answer(query: str = "capital of France") -> dict[str, Any]:
    """The fake's script of one model call: thinking, a web search and its results, a cited answer."""
    return {"blocks": [
        {"type": "thinking", "thinking": THOUGHT},
        {"type": "server_tool_use", "id": "srvtoolu_01Paris", "name": "web_search", "input": {"query": query}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01Paris", "content": SEARCH_RESULTS},
        {"type": "text", "text": "The capital of France is "},
        {"type": "text", "text": "Paris", "citations": [cite(WIKI, "Paris - Encyclopedia", "Paris is the capital.")]},
        {"type": "text", "text": ", a city of museums.",
         "citations": [cite(TRAVEL, "Visit Paris", "Museums."), cite(WIKI, "Paris - Encyclopedia", "Louvre.")]},
    ]}


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_use_chat_thinking_web_search_and_sources(start_server, upstream, node_client, transport):
    """The real client shows the thinking as a reasoning part, the search as a provider-executed
    tool part with its results, the citations as source-url parts, and the text without thinking."""
    server = start_server(SERVER_TOOLS="web_search")
    cid = chat_id()
    upstream.script(searched_answer(), {"text": "You are welcome."})
    thinking = {"type": "enabled", "budget_tokens": 2048}
    result = await node_client({"url": server.url, "transport": transport, "chats": {"a": {"id": cid}}, "steps": [
        {"op": "send", "chat": "a", "text": "What is the capital of France?",
         "body": {"thinking": thinking, "effort": "low", "max_tokens": 8192, "model": "claude-opus-4-5"}},
        {"op": "send", "chat": "a", "text": "Thanks!", "body": {"thinking": thinking, "max_tokens": 8192}}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    _question, answer, _thanks, second = chat["messages"]
    parts = answer["parts"]
    assert [p["type"] for p in parts] == ["step-start", "reasoning", "tool-web_search", "text", "source-url",
                                          "source-url"]
    assert parts[1] == {"type": "reasoning", "id": "reasoning-1", "text": THOUGHT, "state": "done"}
    tool = parts[2]
    assert tool["providerExecuted"] is True and tool["state"] == "output-available"
    assert tool["toolCallId"] == "srvtoolu_01Paris" and tool["input"] == {"query": "capital of France"}
    assert tool["output"] == SEARCH_RESULTS
    sources = [p for p in parts if p["type"] == "source-url"]
    assert [(s["sourceId"], s["url"], s["title"]) for s in sources] == [
        ("source-1", WIKI, "Paris - Encyclopedia"), ("source-2", TRAVEL, "Visit Paris")]
    assert texts(answer) == "The capital of France is Paris, a city of museums."
    assert "search the web" not in json.dumps([p for p in parts if p["type"] != "reasoning"])
    assert chat["finishes"][0]["finishReason"] == "stop"
    assert answer["metadata"]["finish"] == "complete" and answer["metadata"]["stop_reason"] == "end_turn"
    # The chunks, in order: one step (the search result does not end it), then finish.
    first_turn = chat["chunks"][:[c["type"] for c in chat["chunks"]].index("finish") + 1]
    assert kinds(first_turn) == ["start", "start-step", "reasoning-start", "reasoning-delta", "reasoning-end",
                               "tool-input-start", "tool-input-available", "tool-output-available",
                               "text-start", "text-delta", "source-url", "text-delta", "source-url", "text-delta",
                               "text-end", "finish-step", "finish"]
    for chunk in chat["chunks"]:
        check_chunk(chunk)

    # What was asked upstream: the body's thinking and effort, the web search tool; and the
    # next turn sends the thinking (signed) and the search back as the API needs them.
    first, follow = upstream.requests()[-2]["body"], upstream.requests()[-1]["body"]
    assert first["thinking"] == thinking and first.get("output_config", {}).get("effort") == "low"
    assert any(t.get("name") == "web_search" and t["type"].startswith("web_search_") for t in first["tools"])
    assert [b["type"] for b in follow["messages"][1]["content"]][:3] == [
        "thinking", "server_tool_use", "web_search_tool_result"]
    assert texts(second) == "You are welcome."
    if transport == "ws":
        assert result["sockets"] == 1


async def test_use_chat_documents_and_document_sources(shared_server: Server, upstream, node_client):
    """File parts (a PDF, a text file) reach the model as document blocks titled by their file
    names; what the answer cites from them comes back as source-document parts."""
    upstream.script({"blocks": [
        {"type": "text", "text": "The report", "citations": [
            {"type": "page_location", "cited_text": "Revenue grew.", "document_index": 0,
             "document_title": "report.pdf", "start_page_number": 1, "end_page_number": 2}]},
        {"type": "text", "text": " and the notes agree.", "citations": [
            {"type": "char_location", "cited_text": "grew", "document_index": 1, "document_title": None,
             "start_char_index": 0, "end_char_index": 4}]}]})
    result = await node_client({"url": shared_server.url, "transport": "ws", "chats": {"a": {"id": chat_id()}},
                                "steps": [{"op": "send", "chat": "a", "text": "Compare them.", "files": [
                                    file_part("application/pdf", PDF_URL, "report.pdf"),
                                    file_part("text/plain", NOTES_URL, "notes.txt")]}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    answer = chat["messages"][1]
    assert [(p["sourceId"], p["mediaType"], p["title"]) for p in answer["parts"] if p["type"] == "source-document"] \
        == [("source-1", "application/pdf", "report.pdf"), ("source-2", "text/plain", "Document 2")]
    assert texts(answer) == "The report and the notes agree."
    sent = upstream.requests()[-1]["body"]["messages"][-1]["content"]
    documents = [b for b in sent if b["type"] == "document"]
    assert [(d["source"]["type"], d.get("title")) for d in documents] == [("base64", "report.pdf"),
                                                                        ("text", "notes.txt")]
    assert documents[0]["source"]["data"] == base64.b64encode(PDF).decode()
    assert documents[1]["source"] == {"type": "text", "media_type": "text/plain", "data": NOTES}
    assert [b["type"] for b in sent] == ["document", "document", "text"]  # (the client puts files first)
    assert sent[2]["text"] == "Compare them."


async def test_a_paused_turn_goes_on_in_the_same_message(start_server, upstream):
    """pause_turn (a long server tool loop) never reaches the client: the engine continues the
    turn, and the stream stays one message and one step, ending with `stop`."""
    server = start_server(SERVER_TOOLS="web_search")
    paused = searched_answer()
    paused["blocks"] = paused["blocks"][:3]  # thinking, the search and its results
    upstream.script({**paused, "stop_reason": "pause_turn"},
                    {"blocks": [{"type": "text", "text": "Paris.", "citations": [cite(WIKI, "Paris", "Capital.")]}]})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r, chunks = await post_chat(client, chat_body(chat_id(), "What is the capital of France?"))
    assert kinds(chunks) == ["start", "start-step", "reasoning-start", "reasoning-delta", "reasoning-end",
                             "tool-input-start", "tool-input-available", "tool-output-available", "source-url",
                             "text-start", "text-delta", "text-end", "finish-step", "finish"]
    assert chunks[-1]["finishReason"] == "stop" and chunks[-1]["messageMetadata"]["finish"] == "complete"
    assert text_of(chunks) == "Paris."
    assert len(upstream.requests()) == 2  # the continuation


async def test_finish_reasons_from_the_server(shared_server: Server, upstream):
    """turn_end's `finish` on the wire: a refusal is content-filter, a cut-off answer is length."""
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        upstream.script({"text": "I can't help with that.", "stop_reason": "refusal",
                         "stop_details": {"type": "refusal", "category": "cyber", "explanation": None}})
        r, chunks = await post_chat(client, chat_body(chat_id(), "something bad"))
        assert chunks[-1]["finishReason"] == "content-filter"
        assert chunks[-1]["messageMetadata"]["finish"] == "refused"
        assert chunks[-1]["messageMetadata"]["stop_details"]["category"] == "cyber"
        upstream.script({"text": "a b c", "stop_reason": "max_tokens"})
        r, chunks = await post_chat(client, chat_body(chat_id(), "go on"))
        assert chunks[-1]["finishReason"] == "length" and chunks[-1]["messageMetadata"]["finish"] == "truncated"


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
    chunks = mapped(log)
    assert chunks[3] == {"type": "text-delta", "id": "text-1", "delta": tricky}
    assert [c["type"] for c in chunks] == [
        "start", "start-step", "text-start", "text-delta", "text-end", "tool-input-start", "tool-input-error",
        "tool-output-error", "finish-step", "start-step", "text-start", "text-delta", "text-end", "finish-step",
        "finish"]
    assert chunks[6]["errorText"] == "bad" and chunks[6]["input"] == {"x": 1}
    assert UIChunks("T").feed(log[-1])[0] == '{"type":"start","messageId":"T"}'


def mapped(log: list[Any]) -> list[dict[str, Any]]:
    """The chunks UIChunks makes of a turn's events: the same on every run (a resume relies on
    it), each one with exactly the keys the `ai` package's schema allows."""
    from server.transports.ai_sdk import UIChunks

    runs = []
    for _ in range(2):
        mapper = UIChunks("T")
        runs.append([c for e in log for c in mapper.feed(e)])
    assert runs[0] == runs[1]
    chunks = [json.loads(c) for c in runs[0]]
    for raw, chunk in zip(runs[0], chunks):
        check_chunk(chunk)
        assert raw == json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)  # compact
    return chunks


class TurnLog:
    """A turn's encoded events, numbered as the engine numbers them."""

    def __init__(self) -> None:
        from server import events

        self.ev = events
        self.events = [events.encode("T", 1, "turn_start", {"session_id": "S", "turn_id": "T", "model": "m"})]

    def add(self, type_: str, **payload: Any) -> "TurnLog":
        self.events.append(self.ev.encode("T", len(self.events) + 1, type_, payload))
        return self

    def text(self, text: str) -> "TurnLog":
        self.events.append(self.ev.text_delta("T", len(self.events) + 1, text))
        return self

    def thinking(self, text: str) -> "TurnLog":
        return self.add("thinking_delta", thinking=text)

    def end(self, **payload: Any) -> list[Any]:
        """The turn_end, `payload` over the defaults; a key given as None is left out."""
        merged = {"session_id": "S", "turn_id": "T", "model": "m", "stop_reason": "end_turn", "finish": "complete",
                  "truncated": False, "cancelled": False, **payload}
        self.add("turn_end", **{k: v for k, v in merged.items() if v is not None})
        return self.events


def test_redacted_thinking_is_an_empty_marked_reasoning_part():
    chunks = mapped(TurnLog().thinking("Plan.").add("thinking_redacted").text("Done.").end())
    assert chunks[2:9] == [
        {"type": "reasoning-start", "id": "reasoning-1"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "Plan."},
        {"type": "reasoning-end", "id": "reasoning-1"},
        {"type": "reasoning-start", "id": "reasoning-2", "providerMetadata": {"anthropic": {"redacted": True}}},
        {"type": "reasoning-end", "id": "reasoning-2"},
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "Done."}]


def test_thinking_maps_to_reasoning_never_mixed_into_text():
    log = (TurnLog().thinking("Let me ").thinking('think "hard".\n').text("The answer").text(" is 4.")
           .add("tool_call", tool_use_id="tu", name="calculator")
           .add("tool_input", tool_use_id="tu", name="calculator", input={"expression": "2+2"}, valid=True)
           .add("tool_result", tool_use_id="tu", name="calculator", is_error=False, output="4")
           .thinking("Now ").thinking("check.").text("Checked.").thinking("More?").end())
    chunks = mapped(log)
    assert chunks == [
        {"type": "start", "messageId": "T"},
        {"type": "start-step"},
        {"type": "reasoning-start", "id": "reasoning-1"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "Let me "},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": 'think "hard".\n'},
        {"type": "reasoning-end", "id": "reasoning-1"},  # text starts: the reasoning ends
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "The answer"},
        {"type": "text-delta", "id": "text-1", "delta": " is 4."},
        {"type": "text-end", "id": "text-1"},
        {"type": "tool-input-start", "toolCallId": "tu", "toolName": "calculator"},
        {"type": "tool-input-available", "toolCallId": "tu", "toolName": "calculator",
         "input": {"expression": "2+2"}},
        {"type": "tool-output-available", "toolCallId": "tu", "output": "4"},
        {"type": "finish-step"},
        {"type": "start-step"},  # interleaved thinking opens the next model call's step
        {"type": "reasoning-start", "id": "reasoning-2"},
        {"type": "reasoning-delta", "id": "reasoning-2", "delta": "Now "},
        {"type": "reasoning-delta", "id": "reasoning-2", "delta": "check."},
        {"type": "reasoning-end", "id": "reasoning-2"},
        {"type": "text-start", "id": "text-2"},
        {"type": "text-delta", "id": "text-2", "delta": "Checked."},
        {"type": "text-end", "id": "text-2"},  # reasoning starts: the text ends
        {"type": "reasoning-start", "id": "reasoning-3"},
        {"type": "reasoning-delta", "id": "reasoning-3", "delta": "More?"},
        {"type": "reasoning-end", "id": "reasoning-3"},  # any other event ends it: here turn_end
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop", "messageMetadata": {
            "session_id": "S", "turn_id": "T", "model": "m", "stop_reason": "end_turn", "usage": None,
            "estimated_cost_usd": None, "finish": "complete"}},
    ]
    # A thinking-only turn that fails: the reasoning is closed before the error.
    failed = TurnLog().thinking("hmm").add("error", code="overloaded", message="Overloaded.").events
    assert [c["type"] for c in mapped(failed)] == [
        "start", "start-step", "reasoning-start", "reasoning-delta", "reasoning-end", "error", "finish"]
    # Any other event ends reasoning too (here a citation), and the next thinking is a new part.
    cited = (TurnLog().thinking("a").add("citation", citation={"type": "web_search_result_location",
                                                               "url": "https://x.example/", "cited_text": "c"})
             .thinking("b").end())
    assert [(c["type"], c.get("id")) for c in mapped(cited)][2:8] == [
        ("reasoning-start", "reasoning-1"), ("reasoning-delta", "reasoning-1"), ("reasoning-end", "reasoning-1"),
        ("source-url", None), ("reasoning-start", "reasoning-2"), ("reasoning-delta", "reasoning-2")]


WEB_RESULTS = [{"type": "web_search_result", "url": "https://a.example/one", "title": "One",
                "encrypted_content": "EqgB", "page_age": "April 1, 2026"},
               {"type": "web_search_result", "url": "https://b.example/two", "title": "Two",
                "encrypted_content": "EqgC", "page_age": None}]


def test_server_tools_are_provider_executed_and_do_not_end_the_step():
    log = (TurnLog().text("Searching.")
           .add("tool_call", tool_use_id="srvtoolu_1", name="web_search", server=True)
           .add("tool_input", tool_use_id="srvtoolu_1", name="web_search", input={"query": "q"}, valid=True,
                server=True)
           .add("tool_result", tool_use_id="srvtoolu_1", name="web_search", is_error=False, server=True,
                result_type="web_search_tool_result", output=WEB_RESULTS)
           .add("tool_call", tool_use_id="srvtoolu_2", name="web_search", server=True)
           .add("tool_input", tool_use_id="srvtoolu_2", name="web_search", input={"query": "r"}, valid=True,
                server=True)
           .add("tool_result", tool_use_id="srvtoolu_2", name="web_search", is_error=True, server=True,
                result_type="web_search_tool_result",
                error={"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"})
           .add("tool_call", tool_use_id="srvtoolu_3", name="code_execution", server=True)
           .add("tool_call", tool_use_id="toolu_c", name="calculator")
           .add("tool_input", tool_use_id="srvtoolu_3", name="code_execution", input={"code": "print(1)"},
                valid=True, server=True)
           .add("tool_input", tool_use_id="toolu_c", name="calculator", input={"expression": "1+1"}, valid=True)
           .add("tool_result", tool_use_id="srvtoolu_3", name="code_execution", is_error=False, server=True,
                result_type="code_execution_tool_result",
                output={"type": "code_execution_result", "stdout": "1\n", "stderr": "", "return_code": 0,
                        "content": []})
           .add("tool_result", tool_use_id="toolu_c", name="calculator", is_error=False, output="2")
           .text("Done.").end())
    chunks = mapped(log)
    assert chunks[1:] == [
        {"type": "start-step"},
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "Searching."},
        {"type": "text-end", "id": "text-1"},
        {"type": "tool-input-start", "toolCallId": "srvtoolu_1", "toolName": "web_search", "providerExecuted": True},
        {"type": "tool-input-available", "toolCallId": "srvtoolu_1", "toolName": "web_search",
         "input": {"query": "q"}, "providerExecuted": True},
        {"type": "tool-output-available", "toolCallId": "srvtoolu_1", "output": WEB_RESULTS,
         "providerExecuted": True},  # no finish-step: the API goes on within the same call
        {"type": "tool-input-start", "toolCallId": "srvtoolu_2", "toolName": "web_search", "providerExecuted": True},
        {"type": "tool-input-available", "toolCallId": "srvtoolu_2", "toolName": "web_search",
         "input": {"query": "r"}, "providerExecuted": True},
        {"type": "tool-output-error", "toolCallId": "srvtoolu_2", "errorText": "web_search: max_uses_exceeded",
         "providerExecuted": True},
        {"type": "tool-input-start", "toolCallId": "srvtoolu_3", "toolName": "code_execution",
         "providerExecuted": True},
        {"type": "tool-input-start", "toolCallId": "toolu_c", "toolName": "calculator"},
        {"type": "tool-input-available", "toolCallId": "srvtoolu_3", "toolName": "code_execution",
         "input": {"code": "print(1)"}, "providerExecuted": True},
        {"type": "tool-input-available", "toolCallId": "toolu_c", "toolName": "calculator",
         "input": {"expression": "1+1"}},
        {"type": "tool-output-available", "toolCallId": "srvtoolu_3",
         "output": {"type": "code_execution_result", "stdout": "1\n", "stderr": "", "return_code": 0, "content": []},
         "providerExecuted": True},  # the client tool's call is still open: the step goes on
        {"type": "tool-output-available", "toolCallId": "toolu_c", "output": "2"},
        {"type": "finish-step"},  # the client tool's result ends the step, as always
        {"type": "start-step"},
        {"type": "text-start", "id": "text-2"},
        {"type": "text-delta", "id": "text-2", "delta": "Done."},
        {"type": "text-end", "id": "text-2"},
        {"type": "finish-step"},
        chunks[-1],
    ]
    assert chunks[-1]["finishReason"] == "stop"
    # A server tool's result for a call the client never saw still makes a complete tool part.
    orphan = TurnLog().add("tool_result", tool_use_id="srvtoolu_9", name="web_fetch", is_error=False, server=True,
                           result_type="web_fetch_tool_result", output={"type": "web_fetch_result"}).end()
    assert mapped(orphan)[2:4] == [
        {"type": "tool-input-start", "toolCallId": "srvtoolu_9", "toolName": "web_fetch", "providerExecuted": True},
        {"type": "tool-output-available", "toolCallId": "srvtoolu_9", "output": {"type": "web_fetch_result"},
         "providerExecuted": True}]


def test_citations_map_to_one_source_per_url_or_document():
    def web(url: str, title: str | None, text: str) -> dict[str, Any]:
        return {"type": "web_search_result_location", "url": url, "title": title, "cited_text": text,
                "encrypted_index": "Eo8B"}

    chars = {"type": "char_location", "cited_text": "c", "document_index": 0, "document_title": "notes.txt",
             "start_char_index": 0, "end_char_index": 5, "file_id": None}
    log = (TurnLog()
           .add("citation", citation=web("https://a.example/one", "One", "first"))
           .text("Cited one.")
           .add("citation", citation=web("https://a.example/one", "One", "again"))  # the same url: no new source
           .text(" Again.")
           .add("citation", citation=web("https://b.example/two", None, "untitled"))
           .add("citation", citation=chars)
           .add("citation", citation={**chars, "start_char_index": 9})  # the same document
           .add("citation", citation={"type": "page_location", "cited_text": "p", "document_index": 1,
                                      "document_title": None, "start_page_number": 2, "end_page_number": 3})
           .add("citation", citation={"type": "content_block_location", "cited_text": "b", "document_index": 2,
                                      "document_title": "", "start_block_index": 0, "end_block_index": 1})
           .add("citation", citation={"type": "search_result_location", "cited_text": "s", "source": "kb://faq",
                                      "title": "FAQ", "search_result_index": 0, "start_block_index": 0,
                                      "end_block_index": 1})
           .add("citation", citation={"type": "a_future_location", "cited_text": "?"})  # unknown: no source
           .add("citation", citation=None)
           .add("citation", citation={"type": "future_with_url", "url": "https://c.example/"})  # has a url
           .text(" End.").end())
    chunks = mapped(log)
    sources = [c for c in chunks if c["type"].startswith("source-")]
    assert sources == [
        {"type": "source-url", "sourceId": "source-1", "url": "https://a.example/one", "title": "One"},
        {"type": "source-url", "sourceId": "source-2", "url": "https://b.example/two"},
        {"type": "source-document", "sourceId": "source-3", "mediaType": "text/plain", "title": "notes.txt"},
        {"type": "source-document", "sourceId": "source-4", "mediaType": "application/pdf", "title": "Document 2"},
        {"type": "source-document", "sourceId": "source-5", "mediaType": "text/plain", "title": "Document 3"},
        {"type": "source-document", "sourceId": "source-6", "mediaType": "text/plain", "title": "FAQ"},
        {"type": "source-url", "sourceId": "source-7", "url": "https://c.example/"},
    ]
    # Sources do not interrupt the text: one text part; a citation first opens the step.
    assert kinds(chunks)[:4] == ["start", "start-step", "source-url", "text-start"]
    assert [c["type"] for c in chunks].count("text-start") == 1
    assert text_of(chunks) == "Cited one. Again. End."


@pytest.mark.parametrize("finish, stop_reason, reason", [
    ("complete", "end_turn", "stop"), ("complete", "stop_sequence", "stop"),
    ("truncated", "max_tokens", "length"), ("truncated", "model_context_window_exceeded", "length"),
    ("refused", "refusal", "content-filter"), ("unknown", "a_new_reason", "other"),
    ("a-future-finish", "end_turn", "other"),
    (None, "end_turn", "stop"), (None, "max_tokens", "length"), (None, "refusal", "content-filter"),
    (None, "tool_use", "tool-calls"), (None, "something", "other"),  # (no `finish`: as before)
])
def test_finish_reasons(finish, stop_reason, reason):
    end = {"stop_reason": stop_reason, "finish": finish, "truncated": finish == "truncated"}
    if stop_reason == "refusal":
        end["stop_details"] = {"type": "refusal", "category": "cyber", "explanation": None}
    chunks = mapped(TurnLog().text("x").end(**end))
    assert chunks[-2:] == [{"type": "finish-step"}, chunks[-1]]
    assert chunks[-1]["finishReason"] == reason
    metadata = chunks[-1]["messageMetadata"]
    assert metadata["stop_reason"] == stop_reason
    assert ("finish" in metadata) == (finish is not None) and metadata.get("finish") == finish
    assert metadata.get("stop_details") == end.get("stop_details")


def test_a_cancelled_turn_aborts_then_finishes_other():
    for end in ({"finish": "cancelled", "cancelled": True, "stop_reason": "cancelled"},
                {"cancelled": True, "stop_reason": "cancelled", "finish": None}):  # (no `finish`)
        chunks = mapped(TurnLog().thinking("t").end(**end))
        assert kinds(chunks)[-5:] == ["reasoning-delta", "reasoning-end", "finish-step", "abort", "finish"]
        assert chunks[-2] == {"type": "abort", "reason": "cancelled"}
        assert chunks[-1]["finishReason"] == "other"


def test_resumed_websocket_frames_skip_exactly_what_the_client_has():
    """The n-th chunk of a turn is the same on every replay, with reasoning, server tools and
    sources too: a resume after sequence n gets the rest, numbered as before."""
    from server.transports.ai_sdk_ws import ChunkFrames

    log = (TurnLog().thinking("think").add("tool_call", tool_use_id="s1", name="web_search", server=True)
           .add("tool_input", tool_use_id="s1", name="web_search", input={"query": "q"}, valid=True, server=True)
           .add("tool_result", tool_use_id="s1", name="web_search", is_error=False, server=True,
                result_type="web_search_tool_result", output=WEB_RESULTS)
           .add("citation", citation={"type": "web_search_result_location", "url": "https://a.example/one",
                                      "title": "One", "cited_text": "c", "encrypted_index": "x"})
           .text("Answer.").end())
    full = [json.loads(f) for f in ChunkFrames("r", "T", -1).frames(log)]
    for last in (0, 4, 9, len(full) - 2):
        frames = ChunkFrames("r", "T", last)
        resumed = [json.loads(f) for f in frames.frames(log[:3])] + [json.loads(f) for f in frames.frames(log[3:])]
        assert resumed == full[last + 1:]


def test_file_parts_become_image_and_document_blocks():
    from server.config import Settings
    from server.errors import ApiError
    from server.transports.ai_sdk import chat_turn_request

    settings = Settings.from_env({})

    def content(*parts: dict[str, Any], **extra: Any) -> Any:
        body = {"id": "c" * 16, "messages": [{"id": "m1", "role": "user", "parts": list(parts)}], **extra}
        return chat_turn_request(body, body, "p", settings)

    req = content({"type": "text", "text": "Summarise these."}, file_part("application/pdf", PDF_URL, "report.pdf"),
                  file_part("application/pdf", "https://example.com/paper.pdf"),
                  file_part("text/plain", NOTES_URL, "notes.txt"),
                  file_part("text/plain;charset=utf-8", "data:text/plain,a%20b%0Ac", None))
    assert req.content == [
        {"type": "text", "text": "Summarise these."},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                        "data": base64.b64encode(PDF).decode()}, "title": "report.pdf"},
        {"type": "document", "source": {"type": "url", "url": "https://example.com/paper.pdf"}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": NOTES},
         "title": "notes.txt"},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "a b\nc"}},
    ]
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
    assert content(file_part("image/png", "data:image/png;base64," + png)).content == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]

    # `citations: true` turns citations on for the attached documents (not for images or text parts).
    cited = content({"type": "text", "text": "Cite it."}, file_part("text/plain", NOTES_URL, "notes.txt"),
                    citations=True)
    assert cited.content[1]["citations"] == {"enabled": True} and "citations" not in cited.content[0]
    with pytest.raises(ApiError) as bad_citations:
        content({"type": "text", "text": "hi"}, citations="yes")
    assert bad_citations.value.code == "invalid_request"

    # `thinking` and `effort` pass through from the body (checked as for POST /agent).
    req = content({"type": "text", "text": "hi"}, thinking={"type": "enabled", "budget_tokens": 2048},
                  effort="low", max_tokens=4096)
    assert req.thinking == {"type": "enabled", "budget_tokens": 2048} and req.effort == "low"
    with pytest.raises(ApiError) as bad:
        content({"type": "text", "text": "hi"}, thinking={"type": "enabled", "budget_tokens": 10})
    assert bad.value.code == "invalid_thinking"

    for part, code in [
        (file_part("application/zip", "data:application/zip;base64,UEs="), "invalid_request"),
        (file_part("application/pdf", "data:application/pdf,%25PDF"), "invalid_document"),  # not base64
        (file_part("application/pdf", "http://example.com/a.pdf"), "invalid_document"),  # not https
        (file_part("application/pdf", "data:application/pdf;base64," + base64.b64encode(b"no pdf").decode()),
         "invalid_document"),
        (file_part("text/plain", "https://example.com/a.txt"), "invalid_document"),  # text: a data URL only
        (file_part("text/plain", "data:text/plain;base64,//79"), "invalid_document"),  # not UTF-8
        (file_part("text/plain", "data:text/plain;base64,@@@"), "invalid_document"),  # not base64
        ({"type": "file", "url": PDF_URL}, "invalid_request"),  # no mediaType
    ]:
        with pytest.raises(ApiError) as refused:
            content({"type": "text", "text": "hi"}, part)
        assert refused.value.code == code, part


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
            (chat_body(cid, "hi", trigger="resume-stream"), "invalid_request"),
            # regenerate/edit (tests/test_ai_sdk_rewind.py): the answer to regenerate is not sent; an
            # assistant message's id must be a turn id
            ({"id": cid, "trigger": "regenerate-message", "messages": [
                user("hi"), {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "x"}]}]},
             "invalid_request"),
            ({"id": cid, "trigger": "submit-message", "messageId": "m1", "messages": [
                user("hi"), {"id": "a1", "role": "assistant", "parts": []}, user("edited", "m1")]},
             "invalid_request"),
            *(({"id": cid, "trigger": "submit-message", "messageId": wrong, "messages": [user("hi")]},
               "invalid_request") for wrong in (False, 0, ["m1"], {"id": "m1"})),  # (found by the fuzzer)
            ({"id": cid, "trigger": "submit-message", "messages": []}, "invalid_request"),
            ({"id": cid, "messages": [{"id": "a", "role": "user", "parts": [{"type": "text", "text": "  "}]}]},
             "invalid_request"),
            ({"messages": [user("hi")]}, "invalid_request"),
            (chat_body(cid, "hi", model="gpt-4"), "model_not_allowed"),
        ]
        for body, code in cases:
            r = await client.post("/api/chat", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.text)
        # An assistant message last continues a turn waiting for tool answers: here none waits.
        r = await client.post("/api/chat", json={"id": cid, "messages": [
            {"id": "a", "role": "assistant", "parts": [{"type": "text", "text": "x"}]}]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "tool_call_not_pending", r.text
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


async def collect(ws, request_id: str) -> list[dict[str, Any]]:
    """The /api/chat/ws frames of one request, until its `end`, `error` or `no-active`."""
    frames = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert frame["requestId"] == request_id, frame
        frames.append(frame)
        if frame["type"] in ("end", "error", "no-active"):
            return frames


async def test_websocket_frames_sequences_and_last_sequence(shared_server: Server, upstream):
    cid = chat_id()

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
                                  "messages": [user("again"), {"id": "a1", "role": "assistant", "parts": []}],
                                  "headers": {}, "body": {}}))
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["requestId"] == "r4"
        assert "send the messages before it" in error["errorText"]
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
