"""Edit and regenerate with the Vercel AI SDK: `useChat`'s `regenerate()` and
`sendMessage({text, messageId})`, driven by the real `ai` client (tests/node/rewind.mjs) against
real server processes, a real Redis and the fake Anthropic upstream.

Our assistant message ids are turn ids, so the messages the client sends say where its history
forks from the server's: the session is rewound there and the new turn replaces what followed,
once it commits an answer."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import httpx
import pytest
import websockets

from .harness import Server, chat_and_leave, eventually, history_texts
from .real_clients import node_runner

TRANSPORTS = pytest.mark.parametrize("transport", ["http", "ws"])


@pytest.fixture(scope="session")
def rewind_client(node_client: Any) -> Any:
    """run(scenario) -> the result of tests/node/rewind.mjs (see its header); `node_client`
    installs tests/node (or skips without Node.js)."""
    return node_runner("rewind.mjs")


def chat_id() -> str:
    return secrets.token_urlsafe(12)  # a valid session id


def texts(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


def shown(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(role, text) of the client's messages."""
    return [(m["role"], texts(m)) for m in messages]


async def session_of(server: Server, cid: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.get(f"/sessions/{cid}")
    assert r.status_code == 200, r.text
    return r.json()


def record_ids(view: dict[str, Any]) -> list[str]:
    return [r["turn_id"] for r in view["turn_records"]]


def sent_texts(request: dict[str, Any]) -> list[tuple[str, str]]:
    """What the model was sent in one recorded upstream request, (role, text) per message."""
    return history_texts(request["body"]["messages"])


async def two_turns(rewind_client: Any, server: Server, transport: str, cid: str) -> dict[str, Any]:
    """A chat of two answered questions (answers scripted "Answer one.", "Answer two.")."""
    result = await rewind_client({"url": server.url, "transport": transport, "chats": {"a": {"id": cid}}, "steps": [
        {"op": "send", "chat": "a", "text": "Question one"},
        {"op": "send", "chat": "a", "text": "Question two"}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    assert shown(chat["messages"]) == [("user", "Question one"), ("assistant", "Answer one."),
                                       ("user", "Question two"), ("assistant", "Answer two.")]
    return chat


@TRANSPORTS
async def test_regenerate_replaces_the_last_answer(shared_server: Server, upstream, rewind_client, transport):
    cid = chat_id()
    upstream.script({"text": "First answer."}, {"text": "Second answer."})
    result = await rewind_client({"url": shared_server.url, "transport": transport, "chats": {"a": {"id": cid}},
                                  "steps": [{"op": "send", "chat": "a", "text": "Question one"},
                                            {"op": "snapshot", "chat": "a"},
                                            {"op": "regenerate", "chat": "a"}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None and chat["errors"] == [], chat
    old_answer = result["snapshots"][0][1]
    assert texts(old_answer) == "First answer."
    question, answer = chat["messages"]
    assert (question["role"], texts(question)) == ("user", "Question one")
    assert (answer["role"], texts(answer)) == ("assistant", "Second answer.")
    assert answer["id"] != old_answer["id"] and answer["metadata"]["turn_id"] == answer["id"]
    # What useChat sent: the messages before the answer, trigger regenerate-message.
    regenerate = result["requests"][-1]
    assert regenerate["trigger"] == "regenerate-message"
    assert regenerate["messages"] == [[question["id"], "user"]]

    # The model saw the question once, without the old answer.
    calls = upstream.requests()
    assert len(calls) == 2
    assert sent_texts(calls[1]) == [("user", "Question one")]
    assert "First answer." not in json.dumps(calls[1]["body"])

    # The server's history: the new answer in the old one's place.
    view = await session_of(shared_server, cid)
    assert history_texts(view["messages"]) == [("user", "Question one"), ("assistant", "Second answer.")]
    assert record_ids(view) == [answer["id"]]
    assert view["turn_records"][0]["messages"] == 2


@TRANSPORTS
async def test_edit_the_first_message_replaces_the_whole_chat(shared_server: Server, upstream, rewind_client,
                                                               transport):
    cid = chat_id()
    upstream.script({"text": "Answer one."}, {"text": "Answer two."}, {"text": "Edited answer."})
    first = await two_turns(rewind_client, shared_server, transport, cid)
    result = await rewind_client({"url": shared_server.url, "transport": transport,
                                  "chats": {"a": {"id": cid, "messages": first["messages"]}},
                                  "steps": [{"op": "edit", "chat": "a", "index": 0, "text": "Question one, edited"}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    assert shown(chat["messages"]) == [("user", "Question one, edited"), ("assistant", "Edited answer.")]
    edited, answer = chat["messages"]
    assert edited["id"] == first["messages"][0]["id"]  # (the edited message keeps its id)
    edit = result["requests"][-1]
    assert edit["trigger"] == "submit-message" and edit["messageId"] == edited["id"]
    assert edit["messages"] == [[edited["id"], "user"]]

    calls = upstream.requests()
    assert len(calls) == 3
    assert sent_texts(calls[2]) == [("user", "Question one, edited")]

    view = await session_of(shared_server, cid)
    assert history_texts(view["messages"]) == [("user", "Question one, edited"), ("assistant", "Edited answer.")]
    assert record_ids(view) == [answer["id"]]


@TRANSPORTS
async def test_edit_the_second_message_keeps_the_first_turn(shared_server: Server, upstream, rewind_client,
                                                             transport):
    cid = chat_id()
    upstream.script({"text": "Answer one."}, {"text": "Answer two."}, {"text": "Edited answer."})
    result = await rewind_client({"url": shared_server.url, "transport": transport, "chats": {"a": {"id": cid}},
                                  "steps": [{"op": "send", "chat": "a", "text": "Question one"},
                                            {"op": "send", "chat": "a", "text": "Question two"},
                                            {"op": "edit", "chat": "a", "index": 2, "text": "Question two, edited"}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    assert shown(chat["messages"]) == [("user", "Question one"), ("assistant", "Answer one."),
                                       ("user", "Question two, edited"), ("assistant", "Edited answer.")]
    turn1, answer = chat["messages"][1]["id"], chat["messages"][3]["id"]

    calls = upstream.requests()
    assert len(calls) == 3
    assert sent_texts(calls[2]) == [("user", "Question one"), ("assistant", "Answer one."),
                                    ("user", "Question two, edited")]
    assert "Answer two." not in json.dumps(calls[2]["body"])

    view = await session_of(shared_server, cid)
    assert history_texts(view["messages"]) == [("user", "Question one"), ("assistant", "Answer one."),
                                               ("user", "Question two, edited"), ("assistant", "Edited answer.")]
    assert record_ids(view) == [turn1, answer]


async def test_regenerate_an_earlier_answer_drops_the_later_turns(shared_server: Server, upstream, rewind_client):
    """regenerate({messageId}) of the first answer: useChat drops it and all after it."""
    cid = chat_id()
    upstream.script({"text": "Answer one."}, {"text": "Answer two."}, {"text": "Answer one, again."})
    first = await two_turns(rewind_client, shared_server, "http", cid)
    result = await rewind_client({"url": shared_server.url, "transport": "http",
                                  "chats": {"a": {"id": cid, "messages": first["messages"]}},
                                  "steps": [{"op": "regenerate", "chat": "a", "index": 1}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    assert shown(chat["messages"]) == [("user", "Question one"), ("assistant", "Answer one, again.")]
    assert result["requests"][-1]["messageId"] == first["messages"][1]["id"]
    assert sent_texts(upstream.requests()[-1]) == [("user", "Question one")]
    view = await session_of(shared_server, cid)
    assert history_texts(view["messages"]) == [("user", "Question one"), ("assistant", "Answer one, again.")]
    assert record_ids(view) == [chat["messages"][1]["id"]]


@TRANSPORTS
async def test_rewinds_across_two_servers_and_their_workers(start_server, upstream, rewind_client, transport):
    """Two servers of two workers each on one Redis: the turns, the regenerate and the edit of one
    chat land on different servers (and workers)."""
    a = start_server(workers=2, name="rewind-a", wait=False)
    b = start_server(workers=2, name="rewind-b", wait=False)
    a.wait_ready()
    b.wait_ready()
    cid = chat_id()
    upstream.script({"text": "Answer one."}, {"text": "Answer two."}, {"text": "Answer two, again."},
                    {"text": "Edited answer."})
    result = await rewind_client({"url": a.url, "transport": transport, "chats": {"a": {"id": cid}}, "steps": [
        {"op": "send", "chat": "a", "text": "Question one"},
        {"op": "send", "chat": "a", "text": "Question two"},
        {"op": "use", "url": b.url},
        {"op": "regenerate", "chat": "a"},
        {"op": "snapshot", "chat": "a"},
        {"op": "session", "chat": "a"},
        {"op": "use", "url": a.url},
        {"op": "edit", "chat": "a", "index": 0, "text": "Question one, edited"},
        {"op": "use", "url": b.url},
        {"op": "session", "chat": "a"}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None and chat["errors"] == [], chat
    regenerated = result["snapshots"][0]
    assert shown(regenerated) == [("user", "Question one"), ("assistant", "Answer one."),
                                  ("user", "Question two"), ("assistant", "Answer two, again.")]
    after_regenerate = result["sessions"][0]["body"]
    assert history_texts(after_regenerate["messages"]) == shown(regenerated)
    assert record_ids(after_regenerate) == [regenerated[1]["id"], regenerated[3]["id"]]

    assert shown(chat["messages"]) == [("user", "Question one, edited"), ("assistant", "Edited answer.")]
    after_edit = result["sessions"][1]["body"]
    assert history_texts(after_edit["messages"]) == shown(chat["messages"])
    assert record_ids(after_edit) == [chat["messages"][1]["id"]]

    calls = upstream.requests()
    assert len(calls) == 4
    assert sent_texts(calls[2]) == [("user", "Question one"), ("assistant", "Answer one."), ("user", "Question two")]
    assert sent_texts(calls[3]) == [("user", "Question one, edited")]
    for server in (a, b):  # the same history seen from either server
        view = await session_of(server, cid)
        assert history_texts(view["messages"]) == shown(chat["messages"])


@TRANSPORTS
async def test_an_unknown_assistant_id_is_turn_not_found(shared_server: Server, upstream, rewind_client, transport):
    cid = chat_id()
    upstream.script({"text": "Answer one."}, {"text": "Answer two."})
    first = await two_turns(rewind_client, shared_server, transport, cid)
    before = await session_of(shared_server, cid)
    # A page restored with an assistant id that is not one of the chat's turns.
    messages = [dict(m) for m in first["messages"]]
    messages[1]["id"] = secrets.token_urlsafe(16)
    result = await rewind_client({"url": shared_server.url, "transport": transport,
                                  "chats": {"a": {"id": cid, "messages": messages}},
                                  "steps": [{"op": "edit", "chat": "a", "index": 2, "text": "Question two, edited"},
                                            {"op": "regenerate", "chat": "a"}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "error"
    assert len(chat["errors"]) == 2, chat
    for error in chat["errors"]:
        if transport == "http":  # (DefaultChatTransport's error is the response body)
            assert json.loads(error)["error"]["code"] == "turn_not_found"
        assert f"The assistant message {messages[1]['id']} is not a turn of this chat" in error
    assert [r["trigger"] for r in result["requests"]] == ["submit-message", "regenerate-message"]
    assert len(upstream.requests()) == 2  # the model was never called
    after = await session_of(shared_server, cid)
    assert after["messages"] == before["messages"]
    assert after["turn_records"] == before["turn_records"]


@TRANSPORTS
async def test_a_failed_regenerate_keeps_the_old_answer(shared_server: Server, upstream, rewind_client, transport):
    cid = chat_id()
    upstream.script({"text": "First answer."},
                    {"text": "one two three four", "error_after": 2},  # fails mid-answer
                    {"status": 400, "message": "bad request"},  # fails before answering
                    {"text": "Third answer."})
    result = await rewind_client({"url": shared_server.url, "transport": transport, "chats": {"a": {"id": cid}},
                                  "steps": [{"op": "send", "chat": "a", "text": "Question one"},
                                            {"op": "regenerate", "chat": "a"},
                                            {"op": "snapshot", "chat": "a"},
                                            {"op": "session", "chat": "a"},
                                            {"op": "regenerate", "chat": "a"},
                                            {"op": "session", "chat": "a"},
                                            {"op": "regenerate", "chat": "a"},
                                            {"op": "session", "chat": "a"}]})
    chat = result["chats"]["a"]
    first_turn = chat["finishes"][0]["messageId"]
    assert [f["isError"] for f in chat["finishes"]] == [False, True, True, False], chat["finishes"]
    # The client showed the failed answer's partial text in place of the old one ...
    assert shown(result["snapshots"][0]) == [("user", "Question one"), ("assistant", "one two ")]
    # ... but the server kept the old answer, after each failure.
    for failed in result["sessions"][:2]:
        view = failed["body"]
        assert history_texts(view["messages"]) == [("user", "Question one"), ("assistant", "First answer.")]
        assert record_ids(view)[0] == first_turn and view["turn_records"][0]["messages"] == 2
        assert all(r["messages"] == 0 for r in view["turn_records"][1:])  # (failed turns add nothing)
    # The next regenerate replaces it.
    assert chat["status"] == "ready"
    assert shown(chat["messages"]) == [("user", "Question one"), ("assistant", "Third answer.")]
    view = result["sessions"][2]["body"]
    assert history_texts(view["messages"]) == [("user", "Question one"), ("assistant", "Third answer.")]
    assert record_ids(view) == [chat["messages"][1]["id"]]
    calls = upstream.requests()
    assert len(calls) == 4 and all(sent_texts(c) == [("user", "Question one")] for c in calls)


@TRANSPORTS
async def test_edit_after_a_failed_answer(shared_server: Server, upstream, rewind_client, transport):
    """The client keeps a failed turn's partial answer (its id: the failed turn's): an edit of the
    message after it keeps the history up to that turn, which added nothing."""
    cid = chat_id()
    upstream.script({"text": "Answer one."}, {"text": "one two three four", "error_after": 2},
                    {"text": "Answer three."}, {"text": "Edited answer."})
    result = await rewind_client({"url": shared_server.url, "transport": transport, "chats": {"a": {"id": cid}},
                                  "steps": [{"op": "send", "chat": "a", "text": "Question one"},
                                            {"op": "send", "chat": "a", "text": "Question two"},
                                            {"op": "send", "chat": "a", "text": "Question three"},
                                            {"op": "edit", "chat": "a", "index": 4, "text": "Question three, edited"}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready", chat
    assert shown(chat["messages"]) == [("user", "Question one"), ("assistant", "Answer one."),
                                       ("user", "Question two"), ("assistant", "one two "),
                                       ("user", "Question three, edited"), ("assistant", "Edited answer.")]
    failed = chat["messages"][3]["id"]
    assert result["requests"][-1]["messages"][3] == [failed, "assistant"]
    assert sent_texts(upstream.requests()[-1]) == [("user", "Question one"), ("assistant", "Answer one."),
                                                   ("user", "Question three, edited")]
    view = await session_of(shared_server, cid)
    assert history_texts(view["messages"]) == [("user", "Question one"), ("assistant", "Answer one."),
                                               ("user", "Question three, edited"), ("assistant", "Edited answer.")]
    assert record_ids(view) == [chat["messages"][1]["id"], failed, chat["messages"][5]["id"]]
    assert view["turn_records"][1]["status"] == "failed" and view["turn_records"][1]["messages"] == 0


async def test_restore_from_the_session_then_regenerate(shared_server: Server, upstream, rewind_client):
    """A page reloaded: its messages rebuilt from GET /sessions/{id} (assistant ids = turn ids from
    turn_records), then regenerate() of the last answer works as before the reload."""
    cid = chat_id()
    upstream.script({"text": "Answer one."}, {"text": "Answer two."}, {"text": "Answer two, again."})
    await two_turns(rewind_client, shared_server, "ws", cid)
    view = await session_of(shared_server, cid)
    restored, at = [], 0
    for record in view["turn_records"]:
        turn = view["messages"][at:at + record["messages"]]
        at += record["messages"]
        restored.append({"id": secrets.token_hex(8), "role": "user",
                         "parts": [{"type": "text", "text": history_texts(turn[:1])[0][1]}]})
        restored.append({"id": record["turn_id"], "role": "assistant",
                         "parts": [{"type": "text", "text": history_texts(turn[-1:])[0][1]}]})
    result = await rewind_client({"url": shared_server.url, "transport": "http",
                                  "chats": {"a": {"id": cid, "messages": restored}},
                                  "steps": [{"op": "regenerate", "chat": "a"}]})
    chat = result["chats"]["a"]
    assert chat["status"] == "ready" and chat["error"] is None, chat
    assert shown(chat["messages"])[-1] == ("assistant", "Answer two, again.")
    after = await session_of(shared_server, cid)
    assert history_texts(after["messages"]) == [("user", "Question one"), ("assistant", "Answer one."),
                                                ("user", "Question two"), ("assistant", "Answer two, again.")]
    assert record_ids(after) == [view["turn_records"][0]["turn_id"], chat["messages"][3]["id"]]


# -- the wire, from Python ------------------------------------------------------------------
def user(text: str, mid: str | None = None) -> dict[str, Any]:
    return {"id": mid or secrets.token_hex(8), "role": "user", "parts": [{"type": "text", "text": text}]}


def assistant(mid: str, text: str = "an answer") -> dict[str, Any]:
    return {"id": mid, "role": "assistant", "parts": [{"type": "text", "text": text}]}


async def test_refused_rewinds(shared_server: Server, upstream):
    cid = chat_id()
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = await client.post("/api/chat", json={"id": cid, "trigger": "submit-message", "messages": [user("hi")]})
        assert r.status_code == 200
        turn = r.headers["x-turn-id"]
        before = (await client.get(f"/sessions/{cid}")).json()
        for body, status, code, field in [
            # an assistant id that cannot be a turn id
            ({"trigger": "regenerate-message", "messages": [user("hi"), assistant("a1"), user("again")]},
             400, "invalid_request", "messages"),
            ({"trigger": "submit-message", "messageId": "m2",
              "messages": [user("hi"), {"role": "assistant", "parts": []}, user("again", "m2")]},
             400, "invalid_request", "messages"),
            # regenerate must send the messages BEFORE the answer
            ({"trigger": "regenerate-message", "messages": [user("hi"), assistant(turn)]},
             400, "invalid_request", "messages"),
            # a valid id that is not a turn of this chat
            ({"trigger": "regenerate-message", "messages": [user("hi"), assistant(secrets.token_urlsafe(16)),
                                                            user("again")]},
             404, "turn_not_found", "messages"),
        ]:
            r = await client.post("/api/chat", json={"id": cid, **body})
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert (error["code"], error.get("field")) == (code, field), (body, error)
        r = await client.post("/api/chat", json={"id": cid, "trigger": "regenerate-message",
                                                 "messages": [user("hi"), assistant(turn)]})
        assert "send the messages before it" in r.json()["error"]["message"]
        after = (await client.get(f"/sessions/{cid}")).json()
        assert after["messages"] == before["messages"] and after["turn_records"] == before["turn_records"]
    assert len(upstream.requests()) == 1

    # The same over the WebSocket transport: an `error` frame for the request.
    async with websockets.connect(f"{shared_server.ws_url}/api/chat/ws") as ws:
        await ws.send(json.dumps({"type": "send", "requestId": "r1", "id": cid, "trigger": "regenerate-message",
                                  "messages": [user("hi"), assistant(secrets.token_urlsafe(16)), user("again")],
                                  "headers": {}, "body": {}}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert frame["type"] == "error" and frame["requestId"] == "r1"
        assert "is not a turn of this chat" in frame["errorText"]


async def test_an_edit_is_not_an_idempotent_retry(shared_server: Server, upstream):
    """A plain send with the same user message id joins its turn; the edit of that message (same
    id, `messageId`) is a new turn, which replaces it."""
    cid = chat_id()
    upstream.script({"text": "Answer one."}, {"text": "Edited answer."})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        first = {"id": cid, "trigger": "submit-message", "messages": [user("Question one", "m1")]}
        r = await client.post("/api/chat", json=first)
        turn = r.headers["x-turn-id"]
        r = await client.post("/api/chat", json=first)  # a retry: the same turn
        assert r.headers["x-turn-id"] == turn
        r = await client.post("/api/chat", json={"id": cid, "trigger": "submit-message", "messageId": "m1",
                                                 "messages": [user("Question one, edited", "m1")]})
        assert r.status_code == 200
        edited = r.headers["x-turn-id"]
        assert edited != turn
        view = (await client.get(f"/sessions/{cid}")).json()
    assert history_texts(view["messages"]) == [("user", "Question one, edited"), ("assistant", "Edited answer.")]
    assert record_ids(view) == [edited]


def test_requests_map_to_rewinds():
    from server.config import Settings
    from server.errors import ApiError
    from server.store.base import Rewind
    from server.transports.ai_sdk import chat_turn_request, continued_message

    settings = Settings.from_env({})
    t1, t2 = "T" * 16, "U" * 22

    def request(trigger: str, *messages: dict[str, Any], **extra: Any) -> Any:
        body = {"id": "c" * 16, "trigger": trigger, "messages": list(messages), **extra}
        assert continued_message(body) is None  # (not a tool continuation)
        return chat_turn_request(body, body, "p", settings)

    plain = request("submit-message", user("q1", "m1"), assistant(t1), user("q2", "m2"))
    assert plain.rewind is None and plain.message_id == "m2" and plain.content == "q2"
    # regenerate of the last answer (useChat sends the messages before it)
    req = request("regenerate-message", user("q1", "m1"), assistant(t1), user("q2", "m2"), messageId=t2)
    assert req.rewind == Rewind(t1, keep=True) and req.message_id is None and req.content == "q2"
    req = request("regenerate-message", user("q1", "m1"))
    assert req.rewind == Rewind(None, keep=True) and req.content == "q1"
    # an edit: the edited message last, keeping its id
    req = request("submit-message", user("q1, edited", "m1"), messageId="m1")
    assert req.rewind == Rewind(None, keep=True) and req.message_id is None and req.content == "q1, edited"
    req = request("submit-message", user("q1", "m1"), assistant(t1), user("q2", "m2"), assistant(t2),
                  user("q3, edited", "m3"), messageId="m3")
    assert req.rewind == Rewind(t2, keep=True) and req.content == "q3, edited"
    assert req.create_if_missing and req.session_id == "c" * 16
    for bad in ([user("q1"), assistant("short"), user("q2")], [user("q1"), assistant(t1)],
                [user("q1"), {"role": "assistant", "id": 7, "parts": []}, user("q2")]):
        with pytest.raises(ApiError) as refused:
            request("regenerate-message", *bad)
        assert refused.value.code == "invalid_request" and refused.value.extra["field"] == "messages"


async def test_a_rewind_while_a_turn_runs_is_busy(shared_server: Server, upstream):
    cid = chat_id()
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(shared_server.url + "/api/chat", json={
            "id": cid, "trigger": "submit-message", "messages": [user("Question one")]})
        turn = r.headers["x-turn-id"]
        running = await chat_and_leave(client, shared_server.url, cid, user('Count #fake{"tokens":100,"pace_ms":30}'))
        r = await client.post(shared_server.url + "/api/chat", json={
            "id": cid, "trigger": "regenerate-message", "messages": [user("Question one")]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy", r.text
        r = await client.post(shared_server.url + "/api/chat", json={
            "id": cid, "trigger": "submit-message", "messageId": "m9",
            "messages": [user("Question one"), assistant(turn), user("edited", "m9")]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy", r.text
        await client.post(f"{shared_server.url}/sessions/{cid}/cancel")
        view = await eventually(lambda: session_done(shared_server, cid), timeout=10)
    assert view and record_ids(view) == [turn, running]


async def session_done(server: Server, cid: str) -> dict[str, Any] | None:
    view = await session_of(server, cid)
    return view if len(view["turn_records"]) == 2 else None
