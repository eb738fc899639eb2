"""Compaction (CONTEXT_STRATEGY=summarize): when a conversation outgrows CONTEXT_TOKEN_BUDGET,
its older turns are summarised by one model call, and the model sees that summary in their
place. The full history stays stored (clients still read all of it); the summary and how many
messages it covers are kept in the session's meta, written by the turn's commit.

Why ours and not the API's (see the README, "Long conversations"): the API's compaction
features (`context_management` edits, the `compaction` request of the `compact-2026-09-04`
beta) are betas for some models, triggered in the API's terms; this works with every model and
honours the deployment's own budget, and the summary is plain text a rewind can drop.

Where the cut goes: always at a user message that opens a turn (never a tool_result), so a
tool_use keeps its result and an answer keeps its thinking blocks; the latest turn is never
summarised. It compacts to half the budget, so the summary (and the prompt-cache prefix it
starts) stays the same for many turns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import context

INSTRUCTION = (
    "You summarise the earlier part of a conversation between a user and an AI assistant, so that the "
    "assistant can go on with the conversation without its full text. Keep what the rest of the conversation "
    "may need: the user's goals, preferences and constraints; facts, names, numbers and decisions; code, file "
    "names and commands that matter; what tools were used for and what they found; questions still open and "
    "anything the assistant promised. Merge the previous summary, if one is given, into yours. Write in the "
    "conversation's language, as plain prose or short lists, without a preamble: only the summary.")
SUMMARY_HEADER = "[The earlier part of this conversation, summarised (its full text is no longer shown):]\n"
COMPACT_TO = 0.5  # the share of the budget the window is brought down to
BLOCK_CHARS = 2000  # at most this much of one tool input or result in the transcript


def summary_message(summary: str) -> dict[str, Any]:
    """What the model sees first, in place of the messages the summary covers."""
    return {"role": "user", "content": [{"type": "text", "text": SUMMARY_HEADER + summary}]}


def split_point(messages: list[Mapping[str, Any]], covered: int, fixed_chars: int, budget_tokens: int,
                ratio: float, summary_tokens: int) -> int | None:
    """Where the new summary ends: the first message, after `covered`, that opens a turn and
    from which the rest (with room for a summary of up to `summary_tokens`, at most a quarter of
    it) fits in COMPACT_TO of the budget; else the latest turn's first message. None: no turn
    opens after `covered`."""
    opens = [i for i in range(covered + 1, len(messages)) if context.opens_turn(messages[i])]
    if not opens:
        return None
    room = budget_tokens * COMPACT_TO
    target = int(room * ratio) - fixed_chars - int(min(summary_tokens, room / 4) * ratio)
    rest = sum(context.message_chars(m) for m in messages[opens[0]:])
    at = opens[0]
    for i, j in zip(opens, [*opens[1:], len(messages)]):
        at = i
        if rest <= target:
            break
        rest -= sum(context.message_chars(m) for m in messages[i:j])
    return at


def request(model: str, max_tokens: int, previous: str | None, messages: list[Mapping[str, Any]],
            budget_chars: int) -> dict[str, Any]:
    """The summary call: the instruction, the previous summary and a transcript of the messages
    (at most `budget_chars` of it, its latest part)."""
    text = transcript(messages)
    if len(text) > budget_chars:
        text = "[...]\n" + text[-budget_chars:]
    parts = [f"<previous_summary>\n{previous}\n</previous_summary>\n"] if previous else []
    parts.append(f"<conversation>\n{text}\n</conversation>")
    return {"model": model, "max_tokens": max_tokens, "system": INSTRUCTION,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "".join(parts)}]}]}


def transcript(messages: list[Mapping[str, Any]]) -> str:
    """The messages as text: what was said, tools called and what they returned; thinking is left out."""
    lines: list[str] = []
    for message in messages:
        speaker = "User" if message.get("role") == "user" else "Assistant"
        content = message.get("content")
        for block in [{"type": "text", "text": content}] if isinstance(content, str) else content or ():
            line = _block_line(block)
            if line:
                lines.append(f"{speaker}: {line}")
    return "\n".join(lines)


def _block_line(block: Mapping[str, Any]) -> str | None:
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text") or "").strip() or None
    if kind in ("thinking", "redacted_thinking"):
        return None
    if kind in ("tool_use", "server_tool_use"):
        return f"[called the tool {block.get('name')} with {_cut(json.dumps(block.get('input'), ensure_ascii=False))}]"
    if kind == "tool_result":
        error = " (an error)" if block.get("is_error") else ""
        return f"[tool result{error}: {_cut(_result_text(block.get('content')))}]"
    if kind == "image":
        return "[an image]"
    if kind == "document":
        title = block.get("title")
        return f"[a document{': ' + title if isinstance(title, str) and title else ''}]"
    if isinstance(kind, str) and kind.endswith("_tool_result"):
        return f"[{kind}: {_cut(json.dumps(block.get('content'), ensure_ascii=False))}]"
    return f"[{kind}]"


def _result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) if b.get("type") == "text" else f"[{b.get('type')}]"
                        for b in content if isinstance(b, Mapping))
    return json.dumps(content, ensure_ascii=False)


def _cut(text: str) -> str:
    return text if len(text) <= BLOCK_CHARS else text[:BLOCK_CHARS] + " [...]"
