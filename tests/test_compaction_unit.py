"""Compaction's pure functions (server/compaction.py): where the summary ends, the summary call,
the transcript. The end-to-end behaviour is in tests/test_compaction.py."""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from server import compaction, context


@st.composite
def histories(draw):
    """Valid histories ending with the latest question: turns of user text, 0-3 tool rounds (with
    thinking first, sometimes), an answer."""
    messages = []
    for t in range(draw(st.integers(1, 10))):
        question = f"Q{t} " + "u" * draw(st.integers(1, 800))
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        for r in range(draw(st.integers(0, 3))):
            ids = [f"toolu_{t}_{r}_{k}" for k in range(draw(st.integers(1, 2)))]
            thinks = draw(st.booleans())
            thought = [{"type": "thinking", "thinking": f"THOUGHT{t}", "signature": "sig"}] if thinks else []
            messages.append({"role": "assistant", "content": thought + [
                {"type": "tool_use", "id": i, "name": "calculator", "input": {"expression": "1+1"}} for i in ids]})
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": i, "content": "2" * draw(st.integers(1, 300))} for i in ids]})
        said = f"A{t} " + "a" * draw(st.integers(1, 800))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": said}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": "latest"}]})
    return messages


@settings(max_examples=300, deadline=None)
@given(histories(), st.integers(0, 12), st.integers(1000, 8000), st.integers(0, 2000),
       st.sampled_from([1.0, 3.5, 4.0]))
def test_split_point_opens_a_turn_keeps_the_latest_and_keeps_as_much_as_fits(messages, skip, budget, fixed, ratio):
    opens = [i for i, m in enumerate(messages) if context.opens_turn(m)]
    covered = opens[min(skip, len(opens) - 1)]  # a previous summary ends where a turn opens
    upto = compaction.split_point(messages, covered, fixed, budget, ratio, 256)
    later = [i for i in opens if i > covered]
    if not later:
        assert upto is None, "nothing after the summary to compact"
        return
    assert upto in later, "the summary ends where a turn opens: never at a tool_result or an answer"
    assert upto <= opens[-1], "the latest turn is never summarised"
    room = budget * compaction.COMPACT_TO  # (the summary's reservation: at most a quarter of it)
    target = int(room * ratio) - fixed - int(min(256, room / 4) * ratio)
    rest = sum(context.message_chars(m) for m in messages[upto:])
    assert rest <= target or upto == opens[-1], "what is kept fits in the target, or it is the latest turn"
    wider = [i for i in later if i < upto]
    if wider:  # a split further back would not fit: it keeps as much as fits
        assert sum(context.message_chars(m) for m in messages[wider[-1]:]) > target


def test_request_is_the_instruction_and_one_user_message_with_the_previous_summary():
    messages = [{"role": "user", "content": "Hello, I am Ada."}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "SECRET-THOUGHT", "signature": "s"}, {"type": "text", "text": "Hi Ada."}]}]
    params = compaction.request("m", 300, "Earlier: nothing.", messages, 10_000)
    assert params["model"] == "m" and params["max_tokens"] == 300 and params["system"] == compaction.INSTRUCTION
    assert "stream" not in params
    [message] = params["messages"]
    text = message["content"][0]["text"]
    assert message["role"] == "user"
    assert text.index("<previous_summary>") < text.index("Earlier: nothing.") < text.index("<conversation>")
    assert "Hello, I am Ada." in text and "Hi Ada." in text and "SECRET-THOUGHT" not in text
    first = compaction.request("m", 300, None, messages, 10_000)["messages"][0]["content"][0]["text"]
    assert "<previous_summary>" not in first


def test_a_transcript_longer_than_the_budget_keeps_its_latest_part():
    messages = [{"role": "user", "content": "OLDEST " + "x" * 5000}, {"role": "assistant", "content": "NEWEST"}]
    text = compaction.request("m", 300, None, messages, 1000)["messages"][0]["content"][0]["text"]
    assert "NEWEST" in text and "OLDEST" not in text and len(text) < 1100


def test_transcript_renders_tools_as_text_and_leaves_thinking_out():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is 6*7?"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "A" * 100}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "SECRET-THOUGHT", "signature": "s"},
            {"type": "redacted_thinking", "data": "SEALED"},
            {"type": "tool_use", "id": "t1", "name": "calculator", "input": {"expression": "6*7"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is 42."}]},
    ]
    text = compaction.transcript(messages)
    assert "SECRET-THOUGHT" not in text and "SEALED" not in text
    assert "What is 6*7?" in text and "calculator" in text and json.dumps({"expression": "6*7"}) in text
    assert "42" in text and "It is 42." in text and "AAAA" not in text, "an image is named, not inlined"
    lines = text.splitlines()
    assert lines[0].startswith("User") and lines[-1].startswith("Assistant")


def test_summary_message_is_a_user_message_starting_with_the_header():
    assert compaction.summary_message("S") == {"role": "user", "content": [
        {"type": "text", "text": compaction.SUMMARY_HEADER + "S"}]}
