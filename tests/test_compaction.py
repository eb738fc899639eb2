"""Compaction (#19): when a model call's estimated prompt exceeds CONTEXT_TOKEN_BUDGET, the engine
first asks the model (one non-streaming call) to summarise the oldest turns, then sends the summary
in their place; later turns reuse the stored summary, so the prompt's prefix stays the same and the
prompt cache keeps working. The "Compaction" design as tests, against real server processes (uvicorn,
two workers), the real Redis and the fake Anthropic API on a real socket. Every assertion about the
context is about what the model SAW: the fake's recorded request bodies.

Sizes. The budget is 2000 tokens; the engine estimates characters / ratio, the ratio calibrated from
the previous call (the fake counts a JSON character as 1/4 token: ~3.5-3.9 here), so the budget is
~7000-7750 characters. The kept part must fit in half of it, less the tools and system (~560) and room
for a SUMMARY_MAX_TOKENS summary (~1000): ~2050-2330. Measured estimates (margins of 300+ either way):

    turn 1  Q1 5800         A1 short     ~6.4k of 7.0k: fits
    turn 2  Q2  250         A2 250       ~6.7k of 7.75k: fits
    turn 3  Q3 1400         A3 short     ~8.5k: exceeds -> summary of turn 1 (Q2 A2 Q3 ~2.0k fits the
                                         ~2.3k target, Q1.. would not): covers 2 messages
    turn 4  Q4 short        A4 short     summary + Q2..Q4 ~3.0k: fits, no new summary
    turn 5  Q5 2300         A5 short     ~5.4k of 7.4k: fits
    turn 6  Q6 3200         A6 short     ~8.7k: exceeds -> summary of [2, 10) with the previous
                                         summary; Q5 A5 Q6 would not fit, Q6 is the latest: covers 10
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import pytest

from server.config import DEFAULT_PRICES
from server.fake_anthropic.model import cache_usage
from server.usage import PriceTable, Usage

from .harness import FakeUpstream, Server, server_env, sse_turn, strip_cache

MODEL = "claude-sonnet-4-5"
CALC = "calculator"
SUMMARY_MAX_TOKENS = 256  # (the least allowed; split_point leaves room for a summary this long)
SETTINGS = {"CONTEXT_TOKEN_BUDGET": 2000, "ENABLED_TOOLS": CALC, "SUMMARY_MAX_TOKENS": SUMMARY_MAX_TOKENS}
USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")

SUMMARY1 = ("SUMMARY-ONE: The user (Q1) asked a long question about z; the assistant answered briefly (A1). "
            "Nothing else of note was said.")
SUMMARY2 = ("SUMMARY-TWO: Earlier the user asked about z. Later Q2..Q5 covered more z and the assistant "
            "answered each; no decisions pending.")


def said(marker: str, size: int = 0) -> str:
    """A message `size` characters long (at least its marker), recognisable by its marker."""
    return marker + (" " + "z" * (size - len(marker) - 1) if size > len(marker) + 1 else "")


def compaction():  # (imported late: the module lands with the feature)
    from server import compaction as module
    return module


# ---- what the fake saw --------------------------------------------------------------------------------


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content or () if b.get("type") == "text")


def plain(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(role, text) per message, cache markers aside."""
    return [(m["role"], text_of(m["content"])) for m in messages]


def opens_turn(message: dict[str, Any]) -> bool:
    content = message["content"]
    return message["role"] == "user" and (isinstance(content, str)
                                          or not any(b.get("type") == "tool_result" for b in content))


def summary_message(summary: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": compaction().SUMMARY_HEADER + summary}]}


def assert_tool_pairs_whole(messages: list[dict[str, Any]]) -> None:
    """Every tool_use has its tool_result in the next message and every tool_result its tool_use in
    the previous one (the fake refuses a broken history too: this names the break)."""
    for i, m in enumerate(messages):
        content = m["content"] if isinstance(m["content"], list) else []
        for block in content:
            if block.get("type") == "tool_use":
                following = messages[i + 1]["content"] if i + 1 < len(messages) else []
                assert block["id"] in {b.get("tool_use_id") for b in following}, f"tool_use {block['id']} split"
            if block.get("type") == "tool_result":
                before = messages[i - 1]["content"] if i > 0 else []
                assert block["tool_use_id"] in {b.get("id") for b in before if isinstance(b, dict)}, \
                    f"tool_result {block['tool_use_id']} without its tool_use"


def fake_usages(requests: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """The prompt usage the fake reported for each answered request (request id -> usage): its cache
    simulation replayed over the test's requests in order (the fixture reset it at the start)."""
    seen: set[str] = set()
    return {r["request_id"]: cache_usage(seen, r["body"]) for r in requests if r["status"] == 200}


def queued(upstream: FakeUpstream) -> int:
    """Scripted answers not yet served."""
    return upstream.http.post("/_fake/script", json=[]).json()["queued"]


# ---- a conversation -----------------------------------------------------------------------------------


@dataclass
class Turn:
    events: list[dict[str, Any]]
    requests: list[dict[str, Any]]  # what the fake received during the turn

    @property
    def end(self) -> dict[str, Any]:
        return self.events[-1]

    @property
    def summary_calls(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if not r["stream"]]

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The streamed model calls."""
        return [r for r in self.requests if r["stream"]]

    @property
    def sent(self) -> list[dict[str, Any]]:
        """The messages of the turn's first streamed call."""
        return self.calls[0]["body"]["messages"]

    @property
    def compacted(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "context_compacted"]


@dataclass
class Chat:
    client: httpx.AsyncClient
    upstream: FakeUpstream
    session_id: str | None = None
    turns: list[Turn] = field(default_factory=list)

    async def turn(self, question: str | None, *answers: dict[str, Any], url: str = "", **fields: Any) -> Turn:
        """One turn over SSE (`url`: another server's), the fake scripted with `answers` in call order
        (a summary call's answer first); every answer must have been used."""
        before = len(self.upstream.requests())
        assert queued(self.upstream) == 0
        if answers:
            self.upstream.script(*answers)
        body: dict[str, Any] = {**fields}
        if question is not None:
            body["message"] = question
        if self.session_id:
            body["session_id"] = self.session_id
        if url:
            async with httpx.AsyncClient(base_url=url, timeout=60) as other:
                events = await sse_turn(other, body)
        else:
            events = await sse_turn(self.client, body)
        turn = Turn(events, self.upstream.requests()[before:])
        assert turn.end["type"] == "turn_end", turn.end
        assert queued(self.upstream) == 0, "a scripted answer was not asked for"
        self.session_id = turn.end["session_id"]
        self.turns.append(turn)
        return turn

    async def view(self) -> dict[str, Any]:
        r = await self.client.get(f"/sessions/{self.session_id}")
        assert r.status_code == 200, r.text
        return r.json()


def answer(text: str, **extra: Any) -> dict[str, Any]:
    return {"text": text, **extra}


Q1, A1 = said("Q1-MARK", 5800), said("A1-MARK short answer")
Q2, A2 = said("Q2-MARK", 250), said("A2-MARK", 250)
Q3, A3 = said("Q3-MARK", 1400), said("A3-MARK done")
Q4, A4 = said("Q4-MARK short"), said("A4-MARK short")
Q5, A5 = said("Q5-MARK", 2300), said("A5-MARK short")
Q6, A6 = said("Q6-MARK", 3200), said("A6-MARK short")
SUMMARY1_USAGE = {"input_tokens": 1234, "output_tokens": 321}


async def first_compaction(chat: Chat, url: str = "") -> Turn:
    """Turns 1-3: the third one compacts turn 1."""
    one = await chat.turn(Q1, answer(A1), url=url)
    two = await chat.turn(Q2, answer(A2), url=url)
    for t in (one, two):
        assert t.summary_calls == [] and t.compacted == [], "under the budget: nothing to compact"
    return await chat.turn(Q3, answer(SUMMARY1, usage=SUMMARY1_USAGE), answer(A3, usage={"output_tokens": 7}),
                           url=url)


# ---- servers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(fake: FakeUpstream, redis_url: str) -> Iterator[Server]:
    """Two workers, summarize (the default strategy), a 2000-token context budget."""
    srv = Server(server_env(fake, redis_url, WEB_CONCURRENCY=2, **SETTINGS), name="compaction").start()
    yield srv
    srv.stop()


@pytest.fixture
async def chat(server: Server, upstream: FakeUpstream) -> Any:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        yield Chat(client, upstream)


# ---- 1. the turn that exceeds the budget ---------------------------------------------------------------


async def test_the_turn_over_budget_summarises_the_old_turns_once_then_sends_summary_and_kept_turns(chat):
    three = await first_compaction(chat)

    # One non-streaming call: the summariser's instruction, and the old turn as a transcript.
    assert len(three.summary_calls) == 1 and len(three.calls) == 1, [r["stream"] for r in three.requests]
    summarise = three.summary_calls[0]
    assert three.requests[0] is summarise, "the summary comes before the model call that needs it"
    body = summarise["body"]
    assert body.get("stream") in (None, False)
    assert text_of(body["system"]) == compaction().INSTRUCTION
    assert body["model"] == MODEL and body["max_tokens"] == SUMMARY_MAX_TOKENS
    assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
    transcript = text_of(body["messages"][0]["content"])
    assert "<conversation>" in transcript and "<previous_summary>" not in transcript
    assert "Q1-MARK" in transcript and "A1-MARK" in transcript, "the old turn is what is summarised"
    assert "Q3-MARK" not in transcript, "the latest question is never summarised"
    assert "Q2-MARK" not in transcript, "turn 2 is kept (it fits in half the budget), not summarised"

    # The model call: the summary message, then the kept turns, the latest question last.
    sent = three.sent
    assert strip_cache(sent[:1]) == [summary_message(SUMMARY1)]
    assert plain(sent[1:]) == [("user", Q2), ("assistant", A2), ("user", Q3)]
    assert "Q1-MARK" not in json.dumps(sent) and "A1-MARK" not in json.dumps(sent), "old turns are absent"

    # Clients: a context_compacted event after turn_start; the summary itself is never streamed to them.
    types = [e["type"] for e in three.events]
    assert types[0] == "turn_start" and types.count("context_compacted") == 1
    assert types.index("context_compacted") < types.index("text_delta")
    event = three.compacted[0]
    assert event["covers_messages"] == 2 and event["summary_chars"] == len(SUMMARY1)
    assert three.end["text"] == A3
    assert "SUMMARY-ONE" not in json.dumps([e for e in three.events if e["type"] != "context_compacted"])

    # The summary call is paid for by the turn: tokens, cost, model calls, request ids.
    usages = fake_usages(chat.upstream.requests())
    summary_usage = {**usages[summarise["request_id"]], **SUMMARY1_USAGE}
    call_usage = {**usages[three.calls[0]["request_id"]], "output_tokens": 7}
    expected = {k: summary_usage[k] + call_usage[k] for k in USAGE_FIELDS}
    assert {k: three.end["usage"][k] for k in USAGE_FIELDS} == expected
    assert three.end["model_calls"] == 2
    assert three.end["request_ids"] == [summarise["request_id"], three.calls[0]["request_id"]]
    prices = PriceTable(DEFAULT_PRICES)
    assert three.end["estimated_cost_usd"] == pytest.approx(prices.cost(MODEL, Usage(**expected)), abs=1e-7)

    # The session: totals include it; the full history is still there, with the summary beside it.
    view = await chat.view()
    totals = {k: sum(t.end["usage"][k] for t in chat.turns) for k in USAGE_FIELDS}
    assert {k: view["usage"][k] for k in USAGE_FIELDS} == totals
    assert view["estimated_cost_usd"] == pytest.approx(sum(t.end["estimated_cost_usd"] for t in chat.turns),
                                                       abs=1e-7)
    assert plain(view["messages"]) == [("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2),
                                       ("user", Q3), ("assistant", A3)], "stored history is never shortened"
    assert view["summary"] == {"text": SUMMARY1, "covers_messages": 2}
    assert [r["model_calls"] for r in view["turn_records"]] == [1, 1, 2]


async def test_no_summary_before_the_budget_is_exceeded(chat):
    await chat.turn(Q1, answer(A1))
    view = await chat.view()
    assert view["summary"] is None and [r["stream"] for r in chat.upstream.requests()] == [True]


# ---- 2. the next turn reuses the summary: the same prompt prefix, read from the cache -------------------


async def test_the_next_turn_reuses_the_summary_and_its_prompt_prefix_is_unchanged(chat):
    three = await first_compaction(chat)
    four = await chat.turn(Q4, answer(A4))
    assert four.summary_calls == [] and four.compacted == [], "under budget again: no new summary"
    assert len(four.calls) == 1
    before, now = three.calls[0]["body"], four.calls[0]["body"]
    # Byte for byte: the same summary message, and the same tools, system and kept turns after it.
    assert json.dumps(now["messages"][0]) == json.dumps(before["messages"][0])
    assert now["tools"] == before["tools"] and now["system"] == before["system"]
    assert strip_cache(now["messages"][:4]) == strip_cache(before["messages"])
    assert plain(now["messages"][4:]) == [("assistant", A3), ("user", Q4)]
    # The fake's cache simulation: turn 4 reads everything turn 3's call wrote (its prefix, summary included).
    usages = fake_usages(chat.upstream.requests())
    wrote = usages[three.calls[0]["request_id"]]
    assert wrote["cache_creation_input_tokens"] > 0
    read = four.end["usage"]["cache_read_input_tokens"]
    assert read == wrote["cache_read_input_tokens"] + wrote["cache_creation_input_tokens"]
    assert read * 4 > len(compaction().SUMMARY_HEADER + SUMMARY1), "the summary message is in the cached prefix"


# ---- 3. a second compaction builds on the first --------------------------------------------------------


async def test_a_second_compaction_includes_the_previous_summary_and_covers_more(chat):
    await first_compaction(chat)
    await chat.turn(Q4, answer(A4))
    five = await chat.turn(Q5, answer(A5))
    assert five.summary_calls == [], "turn 5 still fits with the summary"
    assert strip_cache(five.sent[:1]) == [summary_message(SUMMARY1)]
    six = await chat.turn(Q6, answer(SUMMARY2), answer(A6))
    assert len(six.summary_calls) == 1
    transcript = text_of(six.summary_calls[0]["body"]["messages"][0]["content"])
    assert "<previous_summary>" in transcript and SUMMARY1 in transcript and "<conversation>" in transcript
    for marker in ("Q2-MARK", "A2-MARK", "Q3-MARK", "A3-MARK", "Q4-MARK", "A4-MARK", "Q5-MARK", "A5-MARK"):
        assert marker in transcript, f"{marker} is in the newly covered range"
    assert "Q1-MARK" not in transcript, "turn 1 is already in the previous summary"
    assert "Q6-MARK" not in transcript
    assert six.compacted[0]["covers_messages"] == 10
    assert strip_cache(six.sent[:1]) == [summary_message(SUMMARY2)]
    assert plain(six.sent[1:]) == [("user", Q6)], "Q5 A5 Q6 would not fit in half the budget"
    assert "SUMMARY-ONE" not in json.dumps(six.sent)
    view = await chat.view()
    assert view["summary"] == {"text": SUMMARY2, "covers_messages": 10}
    assert len(view["messages"]) == 12


# ---- a compaction in the middle of a turn's tool loop -------------------------------------------------


async def test_a_tool_loop_that_outgrows_the_budget_compacts_before_its_next_call(chat):
    """The budget is checked before every model call: the second call of a tool turn compacts the older
    turns (never the running one: the kept part starts at its question, its tool pair whole)."""
    await chat.turn(Q1, answer(A1))
    big = said("A2-MARK", 1600)
    two = await chat.turn(said("Q2-MARK short"), {"text": big, "tool_use": [
        {"name": CALC, "input": {"expression": "6*7"}, "id": "toolu_mid"}]}, answer(SUMMARY1), answer("A2-END"))
    assert [r["stream"] for r in two.requests] == [True, False, True], "call, summary, call"
    first, second = two.calls
    assert compaction().SUMMARY_HEADER not in json.dumps(first["body"]), "the first call fitted"
    sent = second["body"]["messages"]
    assert strip_cache(sent[:1]) == [summary_message(SUMMARY1)]
    assert [m["role"] for m in sent[1:]] == ["user", "assistant", "user"] and opens_turn(sent[1])
    assert text_of(sent[1]["content"]) == said("Q2-MARK short")
    assert_tool_pairs_whole(sent[1:])
    assert "Q1-MARK" not in json.dumps(sent)
    types = [e["type"] for e in two.events]
    assert types.index("tool_result") < types.index("context_compacted"), "after the tool ran, before the call"
    assert two.compacted[0]["covers_messages"] == 2 and two.end["model_calls"] == 3
    assert two.end["text"] == big + "A2-END"
    view = await chat.view()
    assert view["summary"] == {"text": SUMMARY1, "covers_messages": 2} and len(view["messages"]) == 6


# ---- 4. tool pairs and thinking blocks are never split ----------------------------------------------------


@pytest.mark.parametrize("thinking", [False, True], ids=["tools", "thinking+tools"])
async def test_tool_pairs_and_thinking_survive_compaction(start_server, upstream, thinking):
    """A cut by message (not by turn) could keep [tool_result, answer] of turn 2 with the latest question
    (they about fit in half the budget); the kept part must start at a question instead (here: the latest)."""
    env = {**SETTINGS, **({"THINKING_BUDGET_TOKENS": 1024} if thinking else {})}
    srv = start_server(workers=2, **env)

    def think(text: str) -> dict[str, Any]:
        return {"thinking": f"PONDER {text}"} if thinking else {}

    def calc(expression: str, id_: str) -> dict[str, Any]:
        return {"tool_use": [{"name": CALC, "input": {"expression": expression}, "id": id_}]}

    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        chat = Chat(client, upstream)
        q1, a1 = said("Q1-MARK", 2500), said("A1-MARK done")
        one = await chat.turn(q1, {**think("one"), **calc("12345*6789", "toolu_c1")}, {**think("one b"), "text": a1})
        q2, a2 = said("Q2-MARK short"), said("A2-MARK", 2600)
        two = await chat.turn(q2, {**think("two"), "text": a2, **calc("2+3*4", "toolu_c2")},
                              answer(said("A2-END")))
        assert one.summary_calls == two.summary_calls == [], "both turns fit"
        q3 = said("Q3-MARK", 2000)
        three = await chat.turn(q3, answer(SUMMARY1), {**think("three"), **calc("7*6", "toolu_c3")},
                                answer(said("A3-MARK 42")))
        assert three.end["text"].endswith("A3-MARK 42"), three.end
        assert len(three.summary_calls) == 1 and len(three.calls) == 2, "one summary, reused by the tool loop"
        transcript = text_of(three.summary_calls[0]["body"]["messages"][0]["content"])
        # tool calls and results rendered as text; thinking left out
        for seen in ("12345*6789", "83810205", "2+3*4", "14", "Q1-MARK", "A2-MARK"):
            assert seen in transcript, seen
        assert "PONDER" not in transcript, "thinking is not summarised"
        for call in three.calls:
            sent = call["body"]["messages"]
            assert strip_cache(sent[:1]) == [summary_message(SUMMARY1)]
            kept = sent[1:]
            assert opens_turn(kept[0]), "the kept part starts with a question, never a tool_result"
            assert_tool_pairs_whole(kept)
            assert "toolu_c1" not in json.dumps(kept) and "toolu_c2" not in json.dumps(kept)
        assert plain(three.calls[0]["body"]["messages"][1:]) == [("user", q3)]
        if thinking:  # the turn's tool loop went back with its signed thinking first (the fake checks it)
            assert three.calls[1]["body"]["messages"][-2]["content"][0]["type"] == "thinking"
        assert three.compacted[0]["covers_messages"] == 8
        four = await chat.turn(said("Q4-MARK short"), answer(said("A4-MARK")))
        assert four.summary_calls == []
        assert_tool_pairs_whole(four.sent[1:])
        assert (await chat.view())["summary"]["covers_messages"] == 8


# ---- 5. CONTEXT_STRATEGY=trim: today's window ------------------------------------------------------------


async def test_trim_strategy_drops_old_turns_without_a_summary(start_server, upstream):
    srv = start_server(workers=2, **SETTINGS, CONTEXT_STRATEGY="trim")
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        chat = Chat(client, upstream)
        await chat.turn(Q1, answer(A1))
        await chat.turn(Q2, answer(A2))
        three = await chat.turn(Q3, answer(A3))
        assert three.summary_calls == [] and three.compacted == [] and three.end["model_calls"] == 1
        assert plain(three.sent) == [("user", Q2), ("assistant", A2), ("user", Q3)]
        assert compaction().SUMMARY_HEADER not in json.dumps(three.sent)
        view = await chat.view()
        assert view["summary"] is None and len(view["messages"]) == 6
    assert all(r["stream"] for r in upstream.requests())


# ---- 6. a failed summary call does not fail the turn ----------------------------------------------------


@pytest.mark.parametrize("status", [400, 500])
async def test_a_failed_summary_call_falls_back_to_trim(chat, status):
    await chat.turn(Q1, answer(A1))
    await chat.turn(Q2, answer(A2))
    three = await chat.turn(Q3, {"status": status, "message": "summary refused"}, answer(A3))
    assert len(three.summary_calls) == 1 and three.summary_calls[0]["status"] == status
    assert three.end["text"] == A3
    assert three.compacted == [], "nothing was compacted"
    assert plain(three.sent) == [("user", Q2), ("assistant", A2), ("user", Q3)], "trimmed instead"
    assert compaction().SUMMARY_HEADER not in json.dumps(three.sent)
    assert three.end["request_ids"] == [three.summary_calls[-1]["request_id"], three.calls[0]["request_id"]], \
        "the failed summary call's request id is reported (for support), though it did not count as a call"
    assert three.end["model_calls"] == 1
    assert (await chat.view())["summary"] is None
    # No summary was stored: the next turn over the budget tries again.
    four = await chat.turn(Q4, answer(SUMMARY1), answer(A4))
    assert len(four.summary_calls) == 1 and len(four.compacted) == 1
    assert strip_cache(four.sent[:1]) == [summary_message(SUMMARY1)]
    assert (await chat.view())["summary"] == {"text": SUMMARY1,
                                              "covers_messages": four.compacted[0]["covers_messages"]}


async def test_a_summary_is_kept_when_the_model_call_after_it_fails(chat):
    """The summary was paid for and covers messages the failed turn leaves as they were: the commit
    of the failed turn stores it, and the retry does not summarise again."""
    await chat.turn(Q1, answer(A1))
    await chat.turn(Q2, answer(A2))
    before = len(chat.upstream.requests())
    chat.upstream.script(answer(SUMMARY1), {"status": 400, "message": "the model call is refused"})
    events = await sse_turn(chat.client, {"session_id": chat.session_id, "message": Q3})
    assert events[-1]["type"] == "error" and events[-1]["code"] == "bad_request", events[-1]
    assert [e["type"] for e in events].count("context_compacted") == 1
    assert [r["stream"] for r in chat.upstream.requests()[before:]] == [False, True]
    view = await chat.view()
    assert view["summary"] == {"text": SUMMARY1, "covers_messages": 2}
    assert plain(view["messages"]) == [("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2)]
    retry = await chat.turn(Q3, answer(A3))
    assert retry.summary_calls == [] and retry.compacted == []
    assert strip_cache(retry.sent[:1]) == [summary_message(SUMMARY1)]
    assert plain(retry.sent[1:]) == [("user", Q2), ("assistant", A2), ("user", Q3)]


# ---- 8. across servers: the summary is in Redis ---------------------------------------------------------


async def test_a_summary_made_on_one_server_is_reused_on_another(start_server, upstream):
    """(Both with SUMMARY_MODEL: the summary call goes to that model, and is priced as that model.)"""
    env = {**SETTINGS, "SUMMARY_MODEL": "claude-haiku-4-5"}
    a = start_server(workers=2, name="compaction-a", **env)
    b = start_server(workers=2, name="compaction-b", **env)
    async with httpx.AsyncClient(base_url=a.url, timeout=60) as client:
        chat = Chat(client, upstream)
        three = await first_compaction(chat)
        assert len(three.summary_calls) == 1
        assert three.summary_calls[0]["body"]["model"] == "claude-haiku-4-5"
        assert three.calls[0]["body"]["model"] == MODEL and three.end["model"] == MODEL
        usages = fake_usages(upstream.requests())
        summary_usage = Usage(**{**usages[three.summary_calls[0]["request_id"]], **SUMMARY1_USAGE})
        call_usage = Usage(**{**usages[three.calls[0]["request_id"]], "output_tokens": 7})
        prices = PriceTable(DEFAULT_PRICES)
        assert three.end["estimated_cost_usd"] == pytest.approx(
            prices.cost("claude-haiku-4-5", summary_usage) + prices.cost(MODEL, call_usage), abs=1e-7)
        four = await chat.turn(Q4, answer(A4), url=b.url)
        assert four.summary_calls == [] and four.compacted == []
        assert json.dumps(four.sent[0]) == json.dumps(three.sent[0])
        assert plain(four.sent[1:]) == [("user", Q2), ("assistant", A2), ("user", Q3), ("assistant", A3),
                                        ("user", Q4)]
        r = await client.get(f"{b.url}/sessions/{chat.session_id}")
        assert r.json()["summary"] == {"text": SUMMARY1, "covers_messages": 2}


async def test_the_memory_store_keeps_the_summary_too(start_server, upstream):
    """Without Redis (one process): the same summary, reused by the next turn."""
    srv = start_server(redis=False, **SETTINGS)
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        chat = Chat(client, upstream)
        three = await first_compaction(chat)
        assert len(three.summary_calls) == 1 and three.compacted[0]["covers_messages"] == 2
        four = await chat.turn(Q4, answer(A4))
        assert four.summary_calls == [] and json.dumps(four.sent[0]) == json.dumps(three.sent[0])
        assert (await chat.view())["summary"] == {"text": SUMMARY1, "covers_messages": 2}


# ---- 9. a rewind before the covered range drops the summary ----------------------------------------------


async def test_rewind_before_the_summary_drops_it_and_after_keeps_it(chat):
    three = await first_compaction(chat)
    turn_ids = [t["turn_id"] for t in (await chat.view())["turn_records"]]
    assert turn_ids[2] == three.end["turn_id"]
    # Regenerate turn 3 (the cut, 4, is after the covered 2): the summary stays.
    again = await chat.turn(None, answer(said("A3-MARK again")), replace_turn=turn_ids[2])
    assert again.summary_calls == []
    assert json.dumps(again.sent[0]) == json.dumps(three.sent[0])
    assert strip_cache(again.sent) == strip_cache(three.sent), "the same prompt as turn 3's"
    assert (await chat.view())["summary"] == {"text": SUMMARY1, "covers_messages": 2}
    # Edit turn 1 (the cut, 0, is before the covered range): the summary goes.
    edited = await chat.turn("EDITED-Q1", answer("EDITED-A1"), replace_turn=turn_ids[0])
    assert edited.summary_calls == [] and edited.compacted == []
    assert plain(edited.sent) == [("user", "EDITED-Q1")], "no summary of the turns that were replaced"
    view = await chat.view()
    assert view["summary"] is None
    assert plain(view["messages"]) == [("user", "EDITED-Q1"), ("assistant", "EDITED-A1")]
    after = await chat.turn("NEXT", answer("NEXT-A"))
    assert plain(after.sent) == [("user", "EDITED-Q1"), ("assistant", "EDITED-A1"), ("user", "NEXT")]


async def test_rewind_to_between_old_turns_drops_the_summary(chat):
    """Cut at 2 is not before the covered 2 (turn 1 is still summarised); cut inside it is."""
    await first_compaction(chat)
    await chat.turn(Q4, answer(A4))
    await chat.turn(Q5, answer(A5))
    six = await chat.turn(Q6, answer(SUMMARY2), answer(A6))  # covers 10
    assert six.compacted[0]["covers_messages"] == 10
    turn_ids = [t["turn_id"] for t in (await chat.view())["turn_records"]]
    # Edit turn 3: history back to [Q1 A1 Q2 A2] (cut 4 < 10): the summary of [0, 10) goes; Q1 alone is
    # big, but [Q1 A1 Q2 A2 + a short question] still fits the budget: sent whole, no summary call.
    edited = await chat.turn("EDITED-Q3", answer("EDITED-A3"), replace_turn=turn_ids[2])
    assert edited.summary_calls == []
    assert plain(edited.sent) == [("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2),
                                  ("user", "EDITED-Q3")]
    assert (await chat.view())["summary"] is None
