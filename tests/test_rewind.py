"""Edit and regenerate (`replace_turn`): a turn that takes its session back to just before an
earlier turn and runs in its place, over POST /agent, POST /agent/stream and WS /agent/ws, on
real uvicorn workers and servers sharing a real Redis (and a Redis Cluster).

- with `message` (EDIT) the new message replaces that turn's; without (REGENERATE) that turn's
  own stored user message is sent again;
- the model sees only the history before the cut; the commit (fenced by the session lock)
  trims history and turn records to the cut and appends the new turn; a turn that commits no
  message (failed, cancelled before any answer) rewinds nothing; usage and cost are spent:
  the session's totals never go down;
- `turn_start` carries `rewound_turns` (the turns replaced) and, on every turn, `user_text`.

The store's side (`Rewind`, `Started.cut/kept_turns/rewound`, `TurnCommit.cut/kept_turns`) is
checked as a contract of every backend (memory, Redis, Redis Cluster), like tests/test_store.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse

from server.errors import status_of
from server.events import encode
from server.store.base import Busy, Duplicate, NotFound, Rewind, RewindRefused, Started, TurnCommit, new_id
from server.usage import Usage

from .harness import FakeUpstream, Server, eventually, history_texts, server_env
from .test_openapi import check
from .test_store import LOCK_TTL, store  # noqa: F401 — the store fixture: memory, redis, cluster

# Keys of this module's run: two principals (a shared Redis keeps other runs' sessions).
KEY_A, KEY_B = f"sk-agent-rewind-a-{new_id()}", f"sk-agent-rewind-b-{new_id()}"
ALICE, BOB = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
OPEN = dict(AGENT_API_KEYS=f"{KEY_A},{KEY_B}", RATE_LIMIT_RPM=0, RATE_LIMIT_TPM=0,
            MAX_CONCURRENT_STREAMS_PER_PRINCIPAL=0)
TRANSPORTS = ["http", "sse", "ws"]
USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


# -- servers and clients ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(fake: FakeUpstream, redis_url: str) -> Iterator[tuple[Server, Server]]:
    """Server A (two uvicorn workers) and server B (one), on the same Redis: a session made on
    one is rewound on the other, and on A its turns land on either worker."""
    a = Server(server_env(fake, redis_url, WEB_CONCURRENCY=2, **OPEN), name="rewind-a").start(wait=False)
    b = Server(server_env(fake, redis_url, **OPEN), name="rewind-b").start(wait=False)
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture
async def client() -> Any:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


@dataclass
class Outcome:
    """A turn request's result, whatever the transport: its HTTP status (a WebSocket error
    frame: its code's), the turn's events (POST /agent: replayed from the turn's log), the error."""
    status: int
    events: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    session_id: str | None = None
    turn_id: str | None = None

    @property
    def start(self) -> dict[str, Any]:
        starts = [e for e in self.events if e["type"] == "turn_start"]
        assert len(starts) == 1, self.events
        return starts[0]

    @property
    def end(self) -> dict[str, Any]:
        assert self.events and self.events[-1]["type"] in ("turn_end", "error"), self.events
        return self.events[-1]

    @property
    def text(self) -> str:
        return self.end["text"]


async def replay(client: httpx.AsyncClient, server: Server, session_id: str, turn_id: str,
                 headers: dict[str, str]) -> list[dict[str, Any]]:
    """The turn's events from its log (GET /sessions/{id}/stream replays the latest turn)."""
    events = []
    async with aconnect_sse(client, "GET", f"{server.url}/sessions/{session_id}/stream",
                            headers=headers) as source:
        assert source.response.status_code == 200, await source.response.aread()
        async for sse in source.aiter_sse():
            events.append(json.loads(sse.data))
    assert events and all(e.get("id", "").startswith(turn_id + ":") for e in events), (turn_id, events)
    return events


async def run(client: httpx.AsyncClient, transport: str, server: Server, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> Outcome:
    """One turn request over `transport`; its outcome (never raises on an error answer)."""
    headers = ALICE if headers is None else headers
    if transport == "http":
        r = await client.post(f"{server.url}/agent", json=body, headers=headers)
        data = r.json()
        sid, tid = data.get("session_id"), data.get("turn_id")
        events = await replay(client, server, sid, tid, headers) if tid else []
        return Outcome(r.status_code, events, data.get("error"), sid, tid)
    if transport == "sse":
        events = []
        async with aconnect_sse(client, "POST", f"{server.url}/agent/stream", json=body, headers=headers) as source:
            if source.response.status_code != 200:
                data = json.loads(await source.response.aread())
                return Outcome(source.response.status_code, [], data["error"], data.get("session_id"),
                               data.get("turn_id"))
            async for sse in source.aiter_sse():
                events.append(json.loads(sse.data))
        return _outcome(events)
    assert transport == "ws"
    # The connection is bound to the session at connect (as the chat page does); frames name none.
    sid = body.get("session_id")
    url = f"{server.ws_url}/agent/ws" + (f"?session_id={sid}" if sid else "")
    frame = {"type": "message", **{k: v for k, v in body.items() if k != "session_id"}}
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps(frame))
        return _outcome(await ws_events(ws))


async def ws_events(ws: Any) -> list[dict[str, Any]]:
    events = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if event["type"] in ("ping", "pong"):
            continue
        events.append(event)
        if event["type"] in ("turn_end", "error"):
            return events


def _outcome(events: list[dict[str, Any]]) -> Outcome:
    last = events[-1]
    if last["type"] == "turn_end":
        return Outcome(200, events, None, last["session_id"], last["turn_id"])
    error = {k: v for k, v in last.items() if k not in ("type", "id")}
    start = next((e for e in events if e["type"] == "turn_start"), {})
    # A turn's error event has the turn's id in its own (`<turn>:<seq>`); a refused frame has none.
    turn_id = start.get("turn_id") or last.get("id", "").rpartition(":")[0] or None
    return Outcome(status_of(error["code"]), events, error, start.get("session_id"), turn_id)


async def ok(client: httpx.AsyncClient, transport: str, server: Server, body: dict[str, Any],
             headers: dict[str, str] | None = None) -> Outcome:
    outcome = await run(client, transport, server, body, headers)
    assert outcome.status == 200 and outcome.end["type"] == "turn_end", (outcome.status, outcome.error, outcome.events)
    for event in outcome.events:
        check("Event", event)
    assert isinstance(outcome.start["user_text"], str), "every turn_start carries its question"
    return outcome


async def view(client: httpx.AsyncClient, server: Server, session_id: str,
               headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = await client.get(f"{server.url}/sessions/{session_id}", headers=ALICE if headers is None else headers)
    assert r.status_code == 200, r.text
    body = r.json()
    check("SessionView", body)
    return body


async def conversation(client: httpx.AsyncClient, upstream: FakeUpstream, server: Server,
                       questions: list[str], answers: list[str],
                       on: list[Server] | None = None) -> tuple[str, list[str]]:
    """A session of one turn per question (POST /agent, the turns alternating over `on`):
    its id and its turn ids."""
    upstream.script(*[{"text": a} for a in answers])
    sid, tids = None, []
    for n, question in enumerate(questions):
        target = (on or [server])[n % len(on or [server])]
        out = await ok(client, "http", target, {"message": question, **({"session_id": sid} if sid else {})})
        assert out.text == answers[n]
        assert out.start["user_text"] == question and out.start.get("rewound_turns", []) == []
        sid = out.session_id
        tids.append(out.turn_id)
    assert sid is not None
    return sid, tids


def record_ids(v: dict[str, Any]) -> list[str]:
    return [r["turn_id"] for r in v["turn_records"]]


def usage_of(v: dict[str, Any]) -> dict[str, int]:
    return {k: v["usage"][k] for k in USAGE_FIELDS}


def spent(before: dict[str, Any], after: dict[str, Any], *turn_usages: dict[str, int],
          turn_costs: tuple[float, ...] = ()) -> None:
    """Usage and cost totals only grow: after = before + what the new turns spent."""
    for k in USAGE_FIELDS:
        assert after["usage"][k] >= before["usage"][k], (k, before["usage"], after["usage"])
        assert after["usage"][k] == before["usage"][k] + sum(u[k] for u in turn_usages), (k, before, after)
    assert after["estimated_cost_usd"] >= before["estimated_cost_usd"]
    if turn_costs:
        assert after["estimated_cost_usd"] == pytest.approx(before["estimated_cost_usd"] + sum(turn_costs), abs=1e-7)


def sent_texts(upstream: FakeUpstream) -> list[list[tuple[str, str]]]:
    return [history_texts(r["body"]["messages"]) for r in upstream.requests()]


# -- regenerate -----------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_regenerate_the_last_turn_on_the_other_server(servers, upstream, client, transport):
    """REGENERATE (no `message`) of the last turn, on server B, of a session made on A: the model
    is sent the original question once, not the old answer; the session keeps the question and
    the new answer, the old turn's record is gone; turn_start names the turn replaced and the
    question; totals only grow."""
    a, b = servers
    sid, (t1, t2) = await conversation(client, upstream, a, ["What is 2+2?", "And 3+3?"], ["Four.", "Five."])
    before = await view(client, a, sid)
    upstream.reset()
    upstream.script({"text": "Six."})
    out = await ok(client, transport, b, {"session_id": sid, "replace_turn": t2})

    assert out.text == "Six." and out.session_id == sid and out.turn_id not in (t1, t2)
    assert out.start["rewound_turns"] == [t2]
    assert out.start["user_text"] == "And 3+3?"
    assert sent_texts(upstream) == [[("user", "What is 2+2?"), ("assistant", "Four."), ("user", "And 3+3?")]]
    after = await view(client, a, sid)
    assert history_texts(after["messages"]) == [("user", "What is 2+2?"), ("assistant", "Four."),
                                                ("user", "And 3+3?"), ("assistant", "Six.")]
    assert after["messages"][:2] == before["messages"][:2]
    assert after["messages"][2] == before["messages"][2], "the question sent again is the stored one, as it was"
    assert record_ids(after) == [t1, out.turn_id]
    assert after["turn_records"][0] == before["turn_records"][0]
    assert after["turn_records"][1]["status"] == "completed" and after["turn_records"][1]["messages"] == 2
    assert after["turns"] == len(after["turn_records"]) == 2
    assert after["preview"] == "Six." and after["running_turn_id"] is None
    spent(before, after, out.end["usage"], turn_costs=(out.end["estimated_cost_usd"],))
    assert await view(client, b, sid) == after, "every server sees the same session"


async def test_regenerate_sends_the_stored_message_with_its_blocks(servers, upstream, client):
    """A regenerated turn sends the turn's own user message as it was stored (several blocks, an
    image): `user_text` is its text blocks joined by a newline."""
    a, b = servers
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
    message = [{"type": "text", "text": "Look at this"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
               {"type": "text", "text": "What colour is it?"}]
    upstream.script({"text": "Grey."}, {"text": "Black."})
    first = await ok(client, "sse", a, {"message": message})
    assert first.start["user_text"] == "Look at this\nWhat colour is it?"
    assert first.start.get("rewound_turns", []) == []
    again = await ok(client, "ws", b, {"session_id": first.session_id, "replace_turn": first.turn_id})
    assert again.start["user_text"] == "Look at this\nWhat colour is it?"
    assert again.start["rewound_turns"] == [first.turn_id]
    sent = upstream.requests()[-1]["body"]["messages"]
    assert len(sent) == 1 and [b["type"] for b in sent[0]["content"]] == ["text", "image", "text"]
    assert sent[0]["content"][1]["source"]["data"] == png
    after = await view(client, a, first.session_id)
    assert after["messages"][0]["content"] == message
    assert history_texts(after["messages"])[1] == ("assistant", "Black.")
    # A message without text: user_text is "".
    upstream.script({"text": "A pixel."})
    only_image = await ok(client, "sse", b, {"message": [message[1]]})
    assert only_image.start["user_text"] == ""


async def test_a_regenerated_turn_is_gone_a_second_regenerate_of_it_is_turn_not_found(servers, upstream, client):
    """The replaced turn no longer exists: regenerating it again is 404 turn_not_found; its
    replacement can be regenerated. A retry with the same `message_id` joins the first
    regenerate instead of running (and rewinding) again."""
    a, b = servers
    sid, (t1,) = await conversation(client, upstream, a, ["Name a colour."], ["Red."])
    upstream.script({"text": "Blue."})
    first = await ok(client, "http", b, {"session_id": sid, "replace_turn": t1, "message_id": "regen-1"})
    retry = await run(client, "http", a, {"session_id": sid, "replace_turn": t1, "message_id": "regen-1"})
    assert retry.status == 200 and retry.turn_id == first.turn_id and retry.end["text"] == "Blue."
    again = await run(client, "sse", a, {"session_id": sid, "replace_turn": t1})
    assert (again.status, again.error["code"], again.error["retryable"]) == (404, "turn_not_found", False)
    upstream.script({"text": "Green."})
    third = await ok(client, "ws", a, {"session_id": sid, "replace_turn": first.turn_id})
    assert third.start["rewound_turns"] == [first.turn_id]
    after = await view(client, b, sid)
    assert history_texts(after["messages"]) == [("user", "Name a colour."), ("assistant", "Green.")]
    assert record_ids(after) == [third.turn_id]
    assert len(upstream.requests()) == 3, "the retry ran nothing"


# -- edit -----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_edit_the_first_of_three_turns(servers, upstream, client, transport):
    """EDIT (`message`) of turn 1 of 3: the session becomes the edited question and the new
    answer; turns 2 and 3 are gone; the model was sent only the new message."""
    a, b = servers
    sid, tids = await conversation(client, upstream, a, ["I am Ada.", "What is my name?", "Bye."],
                                   ["Hi Ada.", "Ada.", "Bye Ada."], on=[a, b])
    before = await view(client, b, sid)
    upstream.reset()
    upstream.script({"text": "Hi Grace."})
    out = await ok(client, transport, (a, b)[transport == "sse"], {"session_id": sid, "replace_turn": tids[0],
                                                                   "message": "I am Grace."})
    assert out.start["rewound_turns"] == tids
    assert out.start["user_text"] == "I am Grace."
    assert sent_texts(upstream) == [[("user", "I am Grace.")]]
    after = await view(client, a, sid)
    assert history_texts(after["messages"]) == [("user", "I am Grace."), ("assistant", "Hi Grace.")]
    assert record_ids(after) == [out.turn_id] and after["turn_records"][0]["messages"] == 2
    assert after["turns"] == 1
    spent(before, after, out.end["usage"], turn_costs=(out.end["estimated_cost_usd"],))
    # The session goes on from the edited history.
    upstream.script({"text": "Grace."})
    more = await ok(client, transport, b, {"session_id": sid, "message": "What is my name?"})
    assert more.start.get("rewound_turns", []) == [] and more.start["user_text"] == "What is my name?"
    assert sent_texts(upstream)[-1] == [("user", "I am Grace."), ("assistant", "Hi Grace."),
                                        ("user", "What is my name?")]
    assert record_ids(await view(client, b, sid)) == [out.turn_id, more.turn_id]


async def test_an_edit_of_the_first_turn_retitles_a_session_titled_by_its_first_message(servers, upstream, client):
    """The title taken from the first message follows an edit of it (the list would otherwise name
    the conversation after a question it no longer has); a later turn's edit, and a title the user
    gave, leave it."""
    a, b = servers
    sid, tids = await conversation(client, upstream, a, ["Plan a trip to Oslo", "And hotels?"], ["Sure.", "Here."])
    assert (await view(client, b, sid))["title"] == "Plan a trip to Oslo"
    upstream.script({"text": "Sure."}, {"text": "Fine."}, {"text": "Ok."})
    first = await ok(client, "sse", b, {"session_id": sid, "replace_turn": tids[0], "message": "Plan a trip to Rome"})
    v = await view(client, a, sid)
    assert (v["title"], v["title_source"]) == ("Plan a trip to Rome", "message")
    await ok(client, "http", a, {"session_id": sid, "message": "And food?"})
    second = record_ids(await view(client, a, sid))[1]
    await ok(client, "ws", b, {"session_id": sid, "replace_turn": second, "message": "And museums?"})
    assert (await view(client, a, sid))["title"] == "Plan a trip to Rome", "only the first message titles"
    r = await client.patch(f"{a.url}/sessions/{sid}", json={"title": "Holiday"}, headers=ALICE)
    assert r.status_code == 200, r.text
    upstream.script({"text": "Sure."})
    await ok(client, "http", b, {"session_id": sid, "replace_turn": first.turn_id, "message": "Plan a trip to Paris"})
    v = await view(client, a, sid)
    assert (v["title"], v["title_source"]) == ("Holiday", "user"), "a title the user gave stays"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_edit_a_middle_turn_keeps_the_earlier_turns_exactly(servers, upstream, client, transport):
    """EDIT of turn 2 of 3, turn 1 having used a tool (four messages): turn 1's messages and
    record are kept exactly, the model is sent them and the edited question; turns 2-3 are gone."""
    a, b = servers
    upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "6*7"}}]}, {"text": "It is 42."},
                    {"text": "Paris."}, {"text": "Rome."})
    t1 = await ok(client, "http", a, {"message": "What is 6*7?"})
    sid = t1.session_id
    t2 = await ok(client, "sse", b, {"session_id": sid, "message": "Capital of France?"})
    t3 = await ok(client, "ws", a, {"session_id": sid, "message": "And of Italy?"})
    before = await view(client, b, sid)
    assert [r["messages"] for r in before["turn_records"]] == [4, 2, 2]
    assert [m["role"] for m in before["messages"][:4]] == ["user", "assistant", "user", "assistant"]
    upstream.reset()
    upstream.script({"text": "Madrid."})
    out = await ok(client, transport, b if transport == "http" else a,
                   {"session_id": sid, "replace_turn": t2.turn_id, "message": "Capital of Spain?"})
    assert out.start["rewound_turns"] == [t2.turn_id, t3.turn_id]
    assert out.start["user_text"] == "Capital of Spain?"
    (sent,) = upstream.requests()
    assert history_texts(sent["body"]["messages"])[4:] == [("user", "Capital of Spain?")]
    assert len(sent["body"]["messages"]) == 5
    assert [m["content"] if isinstance(m["content"], str) else
            [{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]]
            for m in sent["body"]["messages"][:4]] == [m["content"] for m in before["messages"][:4]]
    after = await view(client, a, sid)
    assert after["messages"][:4] == before["messages"][:4], "turn 1 is kept exactly (tool call and result too)"
    assert history_texts(after["messages"])[4:] == [("user", "Capital of Spain?"), ("assistant", "Madrid.")]
    assert len(after["messages"]) == 6
    assert after["turn_records"][0] == before["turn_records"][0]
    assert record_ids(after) == [t1.turn_id, out.turn_id]
    spent(before, after, out.end["usage"], turn_costs=(out.end["estimated_cost_usd"],))


# -- errors ---------------------------------------------------------------------------------
async def refused(client: httpx.AsyncClient, server: Server, body: dict[str, Any], status: int, code: str,
                  headers: dict[str, str] | None = None, bind: bool = True) -> list[dict[str, Any]]:
    """The same refusal over each transport (nothing started); the error payloads.
    `bind=False`: the WebSocket is not bound to the session at connect (its frame names it)."""
    errors = []
    for transport in TRANSPORTS:
        if transport == "ws" and not bind:
            async with websockets.connect(f"{server.ws_url}/agent/ws",
                                          additional_headers=ALICE if headers is None else headers) as ws:
                await ws.send(json.dumps({"type": "message", **body}))
                out = _outcome(await ws_events(ws))
        else:
            out = await run(client, transport, server, body, headers)
        assert (out.status, out.error and out.error["code"]) == (status, code), (transport, out.status, out.error)
        assert not any(e["type"] == "turn_start" for e in out.events), transport
        assert out.turn_id is None, (transport, "no turn was started")
        errors.append(out.error)
    return errors


async def test_refused_rewinds(servers, upstream, client):
    """What a rewind is refused for, over each transport, before any lock or model call: no
    session_id; a malformed turn id; a turn this session does not have; another principal's
    session (exactly as a session that does not exist). The session is left as it was."""
    a, b = servers
    sid, (t1, t2) = await conversation(client, upstream, a, ["one", "two"], ["1", "2"])
    other_sid, (other_t,) = await conversation(client, upstream, a, ["elsewhere"], ["else"])
    before = await view(client, a, sid)
    calls = len(upstream.requests())

    for body in ({"replace_turn": t1}, {"replace_turn": t1, "message": "edited"}):
        for error in await refused(client, b, body, 400, "invalid_request", bind=False):
            assert error["field"] == "replace_turn" and error["retryable"] is False
    for bad in ("not a turn id!", "short", "x" * 65, "a\nbcdefghijklmnopq", 5, ["t"], {"turn": t1}, ""):
        for body in ({"session_id": sid, "replace_turn": bad},
                     {"session_id": sid, "replace_turn": bad, "message": "m"}):
            for error in await refused(client, a, body, 400, "invalid_request"):
                assert error["field"] == "replace_turn", (bad, error)
    for turn in (new_id(), other_t):  # no such turn, or another session's
        for body in ({"session_id": sid, "replace_turn": turn}, {"session_id": sid, "replace_turn": turn,
                                                                  "message": "m"}):
            for error in await refused(client, b, body, 404, "turn_not_found"):
                assert error["retryable"] is False
    # Another principal's session: as if it did not exist (the same answer as a random id's).
    for body in ({"session_id": sid, "replace_turn": t2}, {"session_id": sid, "replace_turn": t2, "message": "m"}):
        theirs = await refused(client, a, body, 404, "session_not_found", headers=BOB, bind=False)
        nobody = await refused(client, a, {**body, "session_id": new_id()}, 404, "session_not_found",
                               headers=BOB, bind=False)
        assert theirs == nobody
    # Not even a WebSocket can bind to it.
    with pytest.raises(websockets.InvalidStatus) as bound:
        await websockets.connect(f"{b.ws_url}/agent/ws?session_id={sid}", additional_headers=BOB)
    assert bound.value.response.status_code == 403

    assert await view(client, b, sid) == before, "nothing changed"
    assert len(upstream.requests()) == calls, "no model call"
    assert record_ids(await view(client, a, other_sid)) == [other_t]


async def test_regenerate_of_a_failed_turn_is_refused_and_an_edit_of_it_replaces_it(servers, upstream, client):
    """A failed turn left no message: regenerating it is 409 nothing_to_regenerate (send its
    message again); an edit of it replaces it (and the turns after it)."""
    a, b = servers
    sid, (t1,) = await conversation(client, upstream, a, ["first"], ["one"])
    upstream.script({"status": 500})
    failed = await run(client, "http", b, {"session_id": sid, "message": "second"})
    assert failed.status == 502 and failed.error["code"] == "upstream_unavailable"
    t2 = failed.turn_id
    before = await view(client, a, sid)
    assert record_ids(before) == [t1, t2] and before["turn_records"][1]["messages"] == 0
    assert before["turn_records"][1]["status"] == "failed"
    calls = len(upstream.requests())
    for error in await refused(client, a, {"session_id": sid, "replace_turn": t2}, 409, "nothing_to_regenerate"):
        assert error["retryable"] is False
    assert await view(client, b, sid) == before and len(upstream.requests()) == calls

    upstream.script({"text": "two"})
    out = await ok(client, "ws", b, {"session_id": sid, "replace_turn": t2, "message": "second, again"})
    assert out.start["rewound_turns"] == [t2] and out.start["user_text"] == "second, again"
    assert sent_texts(upstream)[-1] == [("user", "first"), ("assistant", "one"), ("user", "second, again")]
    after = await view(client, a, sid)
    assert history_texts(after["messages"]) == [("user", "first"), ("assistant", "one"),
                                                ("user", "second, again"), ("assistant", "two")]
    assert record_ids(after) == [t1, out.turn_id]
    spent(before, after, out.end["usage"])


async def test_a_rewind_while_a_turn_runs_is_session_busy(servers, upstream, client):
    """A rewind of a session whose turn is running (on another server) is 409 session_busy over
    every transport; the running turn goes on and commits."""
    a, b = servers
    sid, (t1,) = await conversation(client, upstream, a, ["first"], ["one"])
    upstream.script({"tokens": 150, "pace_ms": 20})
    running = asyncio.create_task(run(client, "sse", a, {"session_id": sid, "message": "long answer please"}))

    async def busy() -> Any:
        return (await view(client, b, sid))["running_turn_id"]

    running_id = await eventually(busy, timeout=10)
    assert running_id
    # A page coming back to the running turn (on another server) sees its question.
    async with websockets.connect(f"{b.ws_url}/agent/ws?session_id={sid}", additional_headers=ALICE) as ws:
        await ws.send(json.dumps({"type": "resume"}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] == "turn_start" and first["turn_id"] == running_id
        assert first["user_text"] == "long answer please" and first.get("rewound_turns", []) == []
    for body in ({"session_id": sid, "replace_turn": t1}, {"session_id": sid, "replace_turn": t1, "message": "x"}):
        for error in await refused(client, b, body, 409, "session_busy"):
            assert error["turn_id"] == running_id and error["retryable"] is True
    assert not running.done()
    done = await asyncio.wait_for(running, 30)
    assert done.status == 200 and done.turn_id == running_id
    after = await view(client, a, sid)
    assert record_ids(after) == [t1, running_id] and len(after["messages"]) == 4


async def test_regenerate_with_on_busy_interrupt_stops_the_running_turn_and_replaces_it(servers, upstream, client):
    """"Stop and regenerate": `on_busy: interrupt` with `replace_turn` naming the running turn
    cancels it (on the other server; its partial answer commits) and then replaces it."""
    a, b = servers
    sid, (t1,) = await conversation(client, upstream, a, ["first"], ["one"])
    upstream.script({"tokens": 300, "pace_ms": 20}, {"text": "short"})
    events: list[dict[str, Any]] = []
    async with aconnect_sse(client, "POST", f"{a.url}/agent/stream", headers=ALICE,
                            json={"session_id": sid, "message": "tell me a long story"}) as source:
        async for sse in source.aiter_sse():
            events.append(json.loads(sse.data))
            if sum(e["type"] == "text_delta" for e in events) == 3:
                break
    running = events[0]["turn_id"]
    out = await ok(client, "http", b, {"session_id": sid, "replace_turn": running, "on_busy": "interrupt"})
    assert out.text == "short" and out.start["rewound_turns"] == [running]
    assert out.start["user_text"] == "tell me a long story"
    assert sent_texts(upstream)[-1] == [("user", "first"), ("assistant", "one"), ("user", "tell me a long story")]
    after = await view(client, a, sid)
    assert history_texts(after["messages"]) == [("user", "first"), ("assistant", "one"),
                                                ("user", "tell me a long story"), ("assistant", "short")]
    assert record_ids(after) == [t1, out.turn_id]

    # Stopped before any text, the turn left no message: nothing to regenerate (send it again).
    upstream.script({"text": "never seen", "ttft_ms": 8000})
    events = []
    async with aconnect_sse(client, "POST", f"{a.url}/agent/stream", headers=ALICE,
                            json={"session_id": sid, "message": "slow one"}) as source:
        async for sse in source.aiter_sse():
            events.append(json.loads(sse.data))
            break
    waiting = events[0]["turn_id"]
    late = await run(client, "http", b, {"session_id": sid, "replace_turn": waiting, "on_busy": "interrupt"})
    assert (late.status, late.error["code"]) == (409, "nothing_to_regenerate")
    final = await view(client, b, sid)
    assert final["messages"] == after["messages"]
    assert record_ids(final) == [t1, out.turn_id, waiting] and final["turn_records"][2]["messages"] == 0


# -- a rewinding turn that commits nothing rewinds nothing ---------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_failed_rewinding_turn_changes_nothing_but_its_record(servers, upstream, client, transport):
    """A regenerate and an edit whose model call fails: the old answer stays (history as it
    was), the turn records as they were plus the failed turn's (messages 0)."""
    a, b = servers
    sid, (t1, t2) = await conversation(client, upstream, a, ["one", "two"], ["1", "2"])
    before = await view(client, a, sid)
    upstream.script({"status": 500}, {"status": 529, "times": 1})
    regen = await run(client, transport, b, {"session_id": sid, "replace_turn": t2})
    assert regen.status == 502 and regen.error["code"] == "upstream_unavailable", (regen.status, regen.error)
    assert regen.turn_id is not None
    edit = await run(client, transport, a, {"session_id": sid, "replace_turn": t1, "message": "uno"})
    assert edit.status == 503 and edit.error["code"] == "upstream_overloaded", (edit.status, edit.error)
    for out in (regen, edit):  # (whether its turn_start came out depends on how early it failed)
        assert all(e.get("rewound_turns") in (None, [t2] if out is regen else [t1, t2])
                   for e in out.events if e["type"] == "turn_start")
    after = await view(client, b, sid)
    assert after["messages"] == before["messages"]
    assert after["turn_records"][:2] == before["turn_records"]
    assert record_ids(after) == [t1, t2, regen.turn_id, edit.turn_id]
    for record, code in zip(after["turn_records"][2:], ("upstream_unavailable", "upstream_overloaded")):
        assert (record["status"], record["messages"], record["error"]) == ("failed", 0, code)
    assert after["preview"] == before["preview"]
    spent(before, after, *[r["usage"] for r in after["turn_records"][2:]])
    # The old answers are still there to regenerate.
    upstream.script({"text": "two again"})
    out = await ok(client, transport, a, {"session_id": sid, "replace_turn": t2})
    assert out.start["rewound_turns"] == [t2, regen.turn_id, edit.turn_id]
    final = await view(client, a, sid)
    assert history_texts(final["messages"]) == [("user", "one"), ("assistant", "1"), ("user", "two"),
                                                ("assistant", "two again")]
    assert record_ids(final) == [t1, out.turn_id]
    spent(after, final, out.end["usage"])


async def test_a_rewinding_turn_cancelled_before_any_answer_rewinds_nothing(servers, upstream, client):
    """Cancelled (from the other server) while waiting for the first token: history as it was,
    its record appended. Cancelled after some text: the partial answer commits, and so does the
    rewind."""
    a, b = servers
    sid, (t1, t2) = await conversation(client, upstream, a, ["one", "two"], ["1", "2"])
    before = await view(client, a, sid)

    upstream.script({"text": "never seen", "ttft_ms": 8000})
    events = []
    async with aconnect_sse(client, "POST", f"{b.url}/agent/stream", json={"session_id": sid, "replace_turn": t2},
                            headers=ALICE) as source:
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            events.append(json.loads(sse.data))
            if events[-1]["type"] == "turn_start":
                assert events[-1]["rewound_turns"] == [t2] and events[-1]["user_text"] == "two"
                r = await client.post(f"{a.url}/sessions/{sid}/cancel", headers=ALICE)
                assert r.status_code == 202 and r.json()["cancelled_turn_id"] == events[-1]["turn_id"]
    assert events[-1]["type"] == "turn_end" and events[-1]["cancelled"] is True and events[-1]["text"] == ""
    cancelled = events[-1]["turn_id"]
    after = await view(client, b, sid)
    assert after["messages"] == before["messages"], "the old answer stays"
    assert after["turn_records"][:2] == before["turn_records"]
    assert record_ids(after) == [t1, t2, cancelled]
    assert (after["turn_records"][2]["status"], after["turn_records"][2]["messages"]) == ("cancelled", 0)
    spent(before, after, events[-1]["usage"])

    # Cancelled after a few words: they are the new answer, and the rewind is applied.
    upstream.script({"tokens": 200, "pace_ms": 20})
    events, deltas = [], 0
    async with websockets.connect(f"{a.ws_url}/agent/ws?session_id={sid}", additional_headers=ALICE) as ws:
        await ws.send(json.dumps({"type": "message", "replace_turn": t1, "message": "uno"}))
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if event["type"] in ("ping", "pong"):
                continue
            events.append(event)
            deltas += event["type"] == "text_delta"
            if deltas == 3 and event["type"] == "text_delta":
                r = await client.post(f"{b.url}/sessions/{sid}/cancel", headers=ALICE)
                assert r.status_code == 202
            if event["type"] in ("turn_end", "error"):
                break
    end = events[-1]
    assert end["type"] == "turn_end" and end["cancelled"] is True and end["text"].startswith("tok0 tok1 tok2")
    assert events[0]["type"] == "turn_start" and events[0]["rewound_turns"] == [t1, t2, cancelled]
    final = await view(client, b, sid)
    assert history_texts(final["messages"]) == [("user", "uno"), ("assistant", end["text"])]
    assert record_ids(final) == [end["turn_id"]]
    assert (final["turn_records"][0]["status"], final["turn_records"][0]["messages"]) == ("cancelled", 2)
    spent(after, final, end["usage"])


# -- limits ---------------------------------------------------------------------------------
async def test_a_rewind_frees_room_in_a_full_session(start_server, upstream, client):
    """MAX_SESSION_MESSAGES counts what the session will hold: a full session refuses a new
    turn, but a regenerate or an edit (which replaces messages) still runs."""
    server = start_server(name="rewind-full", MAX_SESSION_MESSAGES=4, **OPEN)
    sid, (t1, t2) = await conversation(client, upstream, server, ["one", "two"], ["1", "2"])
    full = await run(client, "http", server, {"session_id": sid, "message": "three"})
    assert (full.status, full.error["code"]) == (413, "session_full")
    refused = record_ids(await view(client, server, sid))[2]  # (the refused turn's record: no message)
    upstream.script({"text": "2 again"}, {"text": "1 again"})
    regen = await ok(client, "sse", server, {"session_id": sid, "replace_turn": t2})
    edit = await ok(client, "ws", server, {"session_id": sid, "replace_turn": t1, "message": "uno"})
    assert regen.start["rewound_turns"] == [t2, refused]
    assert edit.start["rewound_turns"] == [t1, regen.turn_id]
    after = await view(client, server, sid)
    assert history_texts(after["messages"]) == [("user", "uno"), ("assistant", "1 again")]


# -- fencing, end to end --------------------------------------------------------------------
async def test_a_rewinding_turn_that_lost_its_lock_rewinds_nothing(start_server, upstream, client):
    """A worker running an edit stalls (SIGSTOP) past its lock's TTL; another server takes the
    session and commits a turn. When the stalled worker goes on, its commit is refused: neither
    its answer nor its cut is written, the other turn stands on the whole history."""
    env = dict(TURN_LOCK_TTL_SECONDS=2, **OPEN)
    x, y = start_server(name="rewind-stalled", wait=False, **env), start_server(name="rewind-other", **env)
    x.wait_ready()
    sid, (t1, t2) = await conversation(client, upstream, y, ["q1", "q2"], ["a1", "a2"])
    upstream.script({"tokens": 60, "pace_ms": 25})
    head: list[dict[str, Any]] = []
    started = asyncio.Event()

    async def edit() -> list[dict[str, Any]]:
        async with aconnect_sse(client, "POST", f"{x.url}/agent/stream", headers=ALICE,
                                json={"session_id": sid, "replace_turn": t1, "message": "edited"}) as source:
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                head.append(json.loads(sse.data))
                if sum(e["type"] == "text_delta" for e in head) == 2:
                    started.set()
        return head

    stalled = asyncio.create_task(edit())
    await asyncio.wait_for(started.wait(), 15)
    assert head[0]["rewound_turns"] == [t1, t2]
    x.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(3.5)  # the lock expires
        upstream.script({"text": "a3"})
        other = await ok(client, "http", y, {"session_id": sid, "message": "q3"})
        assert other.start.get("rewound_turns", []) == []
    finally:
        x.send_signal(signal.SIGCONT)
    events = await asyncio.wait_for(stalled, 30)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "interrupted", events[-1]
    after = await view(client, y, sid)
    assert history_texts(after["messages"]) == [("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                                                ("assistant", "a2"), ("user", "q3"), ("assistant", "a3")]
    assert record_ids(after) == [t1, t2, other.turn_id], "the stalled turn wrote nothing, not even its record"
    assert after["running_turn_id"] is None


# -- on a Redis Cluster, across servers ----------------------------------------------------
@pytest.mark.parametrize("store_env", ["cluster"], indirect=True)
async def test_rewinds_across_servers_on_a_redis_cluster(start_server, upstream, client, store_env):
    """A session made on server A (two workers), regenerated on B and edited back on A, with
    sessions on a three-master Redis Cluster."""
    a = start_server(workers=2, name="rewind-cluster-a", wait=False, **OPEN)
    b = start_server(name="rewind-cluster-b", **OPEN)
    a.wait_ready()
    sid, (t1, t2, t3) = await conversation(client, upstream, a, ["q1", "q2", "q3"], ["a1", "a2", "a3"], on=[a, b])
    before = await view(client, b, sid)
    upstream.reset()
    upstream.script({"text": "a3 again"}, {"text": "a2 edited"})
    regen = await ok(client, "sse", b, {"session_id": sid, "replace_turn": t3})
    assert regen.start["rewound_turns"] == [t3] and regen.start["user_text"] == "q3"
    edit = await ok(client, "ws", a, {"session_id": sid, "replace_turn": t2, "message": "q2 edited"})
    assert edit.start["rewound_turns"] == [t2, regen.turn_id]
    assert sent_texts(upstream) == [
        [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"), ("user", "q3")],
        [("user", "q1"), ("assistant", "a1"), ("user", "q2 edited")]]
    for server in (a, b):
        after = await view(client, server, sid)
        assert history_texts(after["messages"]) == [("user", "q1"), ("assistant", "a1"), ("user", "q2 edited"),
                                                    ("assistant", "a2 edited")]
        assert record_ids(after) == [t1, edit.turn_id]
        assert after["turn_records"][0] == before["turn_records"][0]
        spent(before, after, regen.end["usage"], edit.end["usage"])


# -- the store's contract (memory, Redis, Redis Cluster) -----------------------------------
def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def turn_commit(turn_id: str, messages: list[dict[str, Any]], started: Started | None = None,
                status: str = "completed", usage: Usage | None = None, cost: float = 0.25) -> TurnCommit:
    """A turn's commit; with `started`, the rewind its begin located (the engine's part)."""
    return TurnCommit(
        messages=messages, record={"turn_id": turn_id, "status": status, "messages": len(messages)},
        usage=usage or Usage(10, 5, 2, 3), cost_usd=cost, last_input_tokens=15, last_input_chars=60,
        events=[encode(turn_id, 1, "turn_end", {"text": ""})],
        cut=started.cut if started is not None else None, kept_turns=started.kept_turns if started is not None else 0)


def plain(history: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(json.dumps({k: m[k] for k in m})) for m in history]


TOOL_TURN = [user("q3"),
             {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "calculator",
                                                "input": {"expression": "1+1"}}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "2"}]},
             assistant("a3")]


async def three_turns(store: Any, owner: str = "o") -> tuple[str, list[str]]:  # noqa: F811 — (the fixture's value)
    """A session of t1 (q1, a1), t2 (failed: no message), t3 (a tool call: four messages)."""
    sid, tids = new_id(), [new_id(), new_id(), new_id()]
    for n, (tid, messages) in enumerate(zip(tids, [[user("q1"), assistant("a1")], [], TOOL_TURN])):
        started = await store.begin_turn(sid, tid, owner=owner, create=n == 0, message_id=None)
        assert isinstance(started, Started) and started.cut is None and started.rewound == []
        assert await store.finish_turn(sid, tid, turn_commit(tid, messages, status="failed" if not messages
                                                             else "completed"))
    return sid, tids


HISTORY = [user("q1"), assistant("a1"), *TOOL_TURN]


@pytest.mark.parametrize("case", ["regenerate-last", "edit-first", "edit-failed", "keep-first", "keep-last",
                                  "keep-none"])
async def test_store_begin_locates_the_rewind(store, case):  # noqa: F811
    """`begin_turn(rewind=...)` finds the turn among the session's records under the lock:
    the history kept (`cut`), the records kept, the turns replaced."""
    sid, (t1, t2, t3) = await three_turns(store)
    rewind, regenerate, cut, kept, rewound = {
        "regenerate-last": (Rewind(t3), True, 2, 2, [t3]),
        "edit-first": (Rewind(t1), False, 0, 0, [t1, t2, t3]),
        "edit-failed": (Rewind(t2), False, 2, 1, [t2, t3]),
        "keep-first": (Rewind(t1, keep=True), False, 2, 1, [t2, t3]),
        "keep-last": (Rewind(t3, keep=True), False, 6, 3, []),
        "keep-none": (Rewind(None, keep=True), False, 0, 0, [t1, t2, t3]),
    }[case]
    tid = new_id()
    started = await store.begin_turn(sid, tid, owner="o", create=False, message_id=None, rewind=rewind,
                                     regenerate=regenerate)
    assert isinstance(started, Started), started
    assert (started.cut, started.kept_turns, started.rewound) == (cut, kept, rewound)
    assert plain(started.history[:cut]) == HISTORY[:cut]
    if regenerate:  # the replaced turn's user message, to send again, follows the cut
        assert plain(started.history)[cut] == user("q3")
    assert await store.lock_holder(sid) == tid
    # Nothing changes until the commit.
    unchanged = await store.get_session(sid, "o")
    assert plain(unchanged.history) == HISTORY and [r["turn_id"] for r in unchanged.turns] == [t1, t2, t3]

    new = [user("new q"), assistant("new a")]
    assert await store.finish_turn(sid, tid, turn_commit(tid, new, started, usage=Usage(7, 1), cost=0.5))
    view = await store.get_session(sid, "o")
    assert plain(view.history) == HISTORY[:cut] + new
    assert [r["turn_id"] for r in view.turns] == [r for r in [t1, t2, t3] if r not in rewound] + [tid]
    assert view.turns[:kept] == unchanged.turns[:kept]
    assert (view.meta.message_count, view.meta.turns) == (cut + 2, kept + 1)
    # Spent stays spent: the replaced turns' usage and cost are still counted.
    assert view.meta.usage.input_tokens == 3 * 10 + 7 and view.meta.usage.output_tokens == 3 * 5 + 1
    assert view.meta.cost_usd == pytest.approx(3 * 0.25 + 0.5)
    assert view.meta.active_turn_id is None and await store.lock_holder(sid) is None
    # The next turn (no rewind) sees the rewound history.
    nxt = await store.begin_turn(sid, new_id(), owner="o", create=False, message_id=None)
    assert isinstance(nxt, Started) and plain(nxt.history) == HISTORY[:cut] + new and nxt.cut is None


async def test_store_refused_rewinds_take_no_lock(store):  # noqa: F811
    """An unknown turn is turn_not_found; regenerating a turn that left no message is
    nothing_to_regenerate; either way no lock is taken and nothing changes. A busy session is
    Busy, another owner's NotFound (a rewind tells nothing more)."""
    sid, (t1, t2, t3) = await three_turns(store)
    for rewind, regenerate, reason in [(Rewind(new_id()), False, "turn_not_found"),
                                       (Rewind(new_id()), True, "turn_not_found"),
                                       (Rewind(new_id(), keep=True), False, "turn_not_found"),
                                       (Rewind(t2), True, "nothing_to_regenerate")]:
        refused = await store.begin_turn(sid, new_id(), owner="o", create=False, message_id=None, rewind=rewind,
                                         regenerate=regenerate)
        assert isinstance(refused, RewindRefused) and refused.reason == reason, (rewind, refused)
        assert await store.lock_holder(sid) is None
    other = await store.begin_turn(sid, new_id(), owner="mallory", create=False, message_id=None, rewind=Rewind(t1))
    assert isinstance(other, NotFound)
    ghost = await store.begin_turn(new_id(), new_id(), owner="o", create=False, message_id=None, rewind=Rewind(t1))
    assert isinstance(ghost, NotFound)
    running = new_id()
    assert isinstance(await store.begin_turn(sid, running, owner="o", create=False, message_id=None), Started)
    busy = await store.begin_turn(sid, new_id(), owner="o", create=False, message_id=None, rewind=Rewind(t3),
                                  regenerate=True)
    assert isinstance(busy, Busy) and busy.running_turn_id == running
    view = await store.get_session(sid, "o")
    assert plain(view.history) == HISTORY and [r["turn_id"] for r in view.turns] == [t1, t2, t3]
    assert view.meta.last_turn_id == running


async def test_store_a_retried_rewind_with_its_message_id_joins_the_first(store):  # noqa: F811
    """The same `message_id` again is the same turn, even once the turn it replaced is gone."""
    sid, (t1, _t2, _t3) = await three_turns(store)
    tid = new_id()
    started = await store.begin_turn(sid, tid, owner="o", create=False, message_id="edit-1", rewind=Rewind(t1))
    assert isinstance(started, Started)
    dup = await store.begin_turn(sid, new_id(), owner="o", create=False, message_id="edit-1", rewind=Rewind(t1))
    assert isinstance(dup, Duplicate) and dup.turn_id == tid
    assert await store.finish_turn(sid, tid, turn_commit(tid, [user("e"), assistant("f")], started))
    dup = await store.begin_turn(sid, new_id(), owner="o", create=False, message_id="edit-1", rewind=Rewind(t1))
    assert isinstance(dup, Duplicate) and dup.turn_id == tid
    assert [r["turn_id"] for r in (await store.get_session(sid, "o")).turns] == [tid]


async def test_store_a_rewind_is_fenced_by_the_lock(store):  # noqa: F811
    """A rewinding turn whose lock expired commits nothing: neither its messages nor its cut;
    the turn that took the session meanwhile appends to the whole history."""
    sid, (t1, t2, t3) = await three_turns(store)
    stale = new_id()
    started = await store.begin_turn(sid, stale, owner="o", create=False, message_id=None, rewind=Rewind(t1))
    assert isinstance(started, Started) and started.cut == 0
    await asyncio.sleep(LOCK_TTL + 0.2)  # the lock expires
    assert not await store.finish_turn(sid, stale, turn_commit(stale, [user("x"), assistant("y")], started)), \
        "nobody holds the lock: a stale commit is refused"
    view = await store.get_session(sid, "o")
    assert plain(view.history) == HISTORY and [r["turn_id"] for r in view.turns] == [t1, t2, t3]
    assert view.meta.message_count == 6 and view.meta.turns == 3
    # Someone else takes the session; the stale commit (and its cut) still writes nothing.
    later = new_id()
    took = await store.begin_turn(sid, later, owner="o", create=False, message_id=None)
    assert isinstance(took, Started) and took.stale_turn_id == stale and took.cut is None
    assert not await store.finish_turn(sid, stale, turn_commit(stale, [user("x"), assistant("y")], started))
    assert await store.finish_turn(sid, later, turn_commit(later, [user("q4"), assistant("a4")]))
    view = await store.get_session(sid, "o")
    assert plain(view.history) == HISTORY + [user("q4"), assistant("a4")]
    assert [r["turn_id"] for r in view.turns] == [t1, t2, t3, later]
    assert view.meta.message_count == 8 and view.meta.turns == 4


async def test_store_a_commit_without_a_cut_rewinds_nothing(store):  # noqa: F811
    """A rewinding turn that left no message is committed without its cut (the engine's rule):
    its record is appended, the history and the other records stay."""
    sid, (t1, t2, t3) = await three_turns(store)
    tid = new_id()
    started = await store.begin_turn(sid, tid, owner="o", create=False, message_id=None, rewind=Rewind(t3),
                                     regenerate=True)
    assert isinstance(started, Started) and started.cut == 2
    assert await store.finish_turn(sid, tid, turn_commit(tid, [], None, status="failed"))
    view = await store.get_session(sid, "o")
    assert plain(view.history) == HISTORY and [r["turn_id"] for r in view.turns] == [t1, t2, t3, tid]
    assert view.meta.usage.input_tokens == 40
