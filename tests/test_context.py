"""The context window and cache breakpoints (pure functions), and the price table."""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from server import context
from server.store.base import StoredMessage
from server.usage import PriceTable, Usage


@st.composite
def histories(draw):
    """Valid histories: turns of user text, then 0-3 tool rounds, then an assistant answer."""
    messages = []
    for t in range(draw(st.integers(1, 12))):
        messages.append({"role": "user", "content": [{"type": "text", "text": "u" * draw(st.integers(1, 400))}]})
        for r in range(draw(st.integers(0, 3))):
            ids = [f"toolu_{t}_{r}_{k}" for k in range(draw(st.integers(1, 3)))]
            messages.append({"role": "assistant", "content": [
                {"type": "tool_use", "id": i, "name": "calculator", "input": {"expression": "1+1" * draw(st.integers(1, 50))}}
                for i in ids]})
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": i, "content": "2" * draw(st.integers(1, 300))} for i in ids]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "a" * draw(st.integers(1, 400))}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": "latest"}]})
    return messages


@settings(max_examples=300, deadline=None)
@given(histories(), st.integers(1000, 6000), st.integers(0, 3000))
def test_window_never_splits_a_tool_pair_and_starts_with_a_user_turn(messages, budget, fixed):
    start, _chars = context.window(messages, fixed, budget, ratio=1.0)
    window = messages[start:]
    assert window[0]["role"] == "user"
    assert context.opens_turn(window[0]), "a window never starts with tool results"
    seen_uses: set[str] = set()
    for i, m in enumerate(window):
        for block in m["content"]:
            if block["type"] == "tool_use":
                seen_uses.add(block["id"])
                nxt = window[i + 1]["content"]
                assert block["id"] in {b.get("tool_use_id") for b in nxt}, "tool_use without its result"
            if block["type"] == "tool_result":
                assert block["tool_use_id"] in seen_uses, "tool_result without its tool_use"
    assert window[-1] is messages[-1], "the latest message is always sent"
    # It only drops what it must: the window fits, or it is already down to the last turn.
    fits = fixed + sum(context.message_chars(m) for m in window) <= budget
    last_turn_start = max(i for i, m in enumerate(messages) if context.opens_turn(m))
    assert fits or start == last_turn_start
    if start > 0:
        prev_starts = [i for i, m in enumerate(messages[:start]) if context.opens_turn(m)]
        wider = fixed + sum(context.message_chars(m) for m in messages[prev_starts[-1]:])
        assert wider > budget, "a wider window would have fit"


def test_small_history_is_sent_whole():
    messages = [{"role": "user", "content": "hi"}]
    assert context.window(messages, 10, 1000, 3.5)[0] == 0


def test_breakpoints_mark_tools_system_and_latest_message_without_mutating():
    tools = [{"name": "a"}, {"name": "b"}]
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
                {"role": "user", "content": [{"type": "text", "text": "two"}]}]
    system, m = context.with_breakpoints("sys", messages, caching=True)
    t = context.tool_definitions(tools, caching=True)
    assert system == [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}]
    assert "cache_control" not in t[0] and t[1]["cache_control"] == {"type": "ephemeral"}
    assert m[-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in messages[-1]["content"][-1] and "cache_control" not in tools[1]
    assert context.with_breakpoints("sys", messages, caching=False) == ("sys", messages)
    assert context.tool_definitions(tools, caching=False) == tools


def test_breakpoint_skips_thinking_blocks_the_api_will_not_cache():
    """A paused answer sent back to be continued is the last message; the API refuses cache_control
    on its thinking blocks, so the rolling breakpoint goes on the last block that may carry one."""
    thinking = {"type": "thinking", "thinking": "t", "signature": "s"}
    paused = {"role": "assistant", "content": [{"type": "text", "text": "a"}, thinking]}
    _, m = context.with_breakpoints("", [{"role": "user", "content": "q"}, paused], caching=True)
    assert m[-1]["content"] == [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}, thinking]
    only = {"role": "assistant", "content": [thinking]}
    assert context.with_breakpoints("", [only], caching=True)[1] == [only]


def test_document_estimates():
    text = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x" * 1000}}
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "A" * 80_000}}
    url = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    assert context.message_chars({"role": "user", "content": [text]}) == 1008
    assert context.message_chars({"role": "user", "content": [pdf]}) == 10_008
    assert context.message_chars({"role": "user", "content": [url]}) == 6008


def test_calibrated_ratio():
    assert context.chars_per_token(0, 0) == context.DEFAULT_CHARS_PER_TOKEN
    assert context.chars_per_token(1000, 4200) == 4.2


def test_cache_tokens_are_priced_as_cache():
    prices = PriceTable({"m": {"input": 3.0, "output": 15.0, "cache_write": 3.75, "cache_read": 0.30}})
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_creation_input_tokens=1_000_000,
                  cache_read_input_tokens=1_000_000)
    assert prices.cost("m", usage) == 3.0 + 15.0 + 3.75 + 0.30
    assert prices.cost("m", Usage(cache_read_input_tokens=10_000)) == 0.003
    assert prices.cost("unknown", usage) == 0.0


def stored(message: dict) -> StoredMessage:
    return StoredMessage(json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode())


@settings(max_examples=100, deadline=None)
@given(histories(), st.integers(300, 6000))
def test_stored_history_is_sized_and_sent_without_a_parse(messages, budget):
    """Redis hands history back as JSON: windowing and the request body splice it as is,
    and the result is what the plain messages would give."""
    from server.upstream import encode_request

    history = [stored(m) for m in messages[:-1]]
    start, chars = context.window([*history, messages[-1]], 0, 10**9, 3.5)
    assert start == 0 and all(m._value is None for m in history)  # sized without parsing
    start, chars = context.window([*history, messages[-1]], 0, budget, 3.5)
    sent = [*history, messages[-1]][start:]
    assert context.opens_turn(sent[0])
    body = encode_request({"model": "m", "max_tokens": 9, "messages": sent})
    assert json.loads(body) == {"model": "m", "max_tokens": 9, "stream": True, "messages": messages[start:]}


def test_pre_encoded_parameters_are_spliced_into_the_body():
    from server.upstream import RawJSON, encode_request

    tools = [{"name": "calc", "description": "é \"quoted\"", "input_schema": {"type": "object"}}]
    params = {"model": "m", "max_tokens": 9, "tools": RawJSON(json.dumps(tools).encode()),
              "system": "s", "messages": [stored({"role": "user", "content": "hi"})]}
    assert json.loads(encode_request(params)) == {
        "model": "m", "max_tokens": 9, "tools": tools, "system": "s", "stream": True,
        "messages": [{"role": "user", "content": "hi"}]}


def test_messages_url_is_the_one_the_sdk_would_build():
    import anthropic

    from server.upstream import messages_url

    for base in ("http://127.0.0.1:9/", "https://gateway.example/anthropic", "https://h.example/a/b/?"):
        client = anthropic.AsyncAnthropic(api_key="k", base_url=base)
        assert messages_url(client) == client._prepare_url("/v1/messages")


def test_stored_message_with_an_image_is_estimated_like_a_plain_one():
    image = {"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 400_000}},
        {"type": "text", "text": "what is this?"}]}
    assert context.message_chars(stored(image)) == context.message_chars(image) < 10_000
    text = {"role": "user", "content": "é" * 100}
    assert context.message_chars(stored(text)) == len(json.dumps(text, ensure_ascii=False, separators=(",", ":")))
