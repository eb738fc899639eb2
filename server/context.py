"""What each model call sends: the context window and the prompt-cache breakpoints.

Stored history is never shortened; only the window sent shrinks when the estimate exceeds
`CONTEXT_TOKEN_BUDGET`. A window starts at a user message that opens a turn (never a
`tool_result`), so a tool_use keeps its result and no window starts with the assistant.
Token estimates are characters divided by a ratio calibrated from the session's last call
(its reported prompt tokens): cheap, and self-correcting for the conversation's language.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .store.base import StoredMessage

CACHE = {"type": "ephemeral"}
UNCACHEABLE = frozenset({"thinking", "redacted_thinking"})
DEFAULT_CHARS_PER_TOKEN = 3.5


def message_chars(message: Mapping[str, Any]) -> int:
    if isinstance(message, StoredMessage) and b'"type":"image"' not in message.raw \
            and b'"type":"document"' not in message.raw:
        raw = message.raw  # its JSON's characters: close enough, and no parse
        return len(raw) if raw.isascii() else len(raw.decode())
    content = message.get("content")
    if isinstance(content, str):
        return len(content) + 8
    total = 8
    for block in content or ():
        kind = block.get("type")
        if kind == "text":
            total += len(block.get("text", ""))
        elif kind == "image":
            total += 6000  # ~1.5k tokens: the typical cost of an image
        elif kind == "document":  # text as it is; a PDF's text is a fraction of its (base64) bytes
            source = block.get("source") or {}
            data = source.get("data") if isinstance(source.get("data"), str) else ""
            total += len(data) if source.get("type") == "text" else len(data) // 8 if data else 6000
        else:
            total += len(json.dumps(block, separators=(",", ":")))
    return total


def chars_per_token(last_input_tokens: int, last_input_chars: int) -> float:
    if last_input_tokens > 0 and last_input_chars > 0:
        return max(1.0, min(8.0, last_input_chars / last_input_tokens))
    return DEFAULT_CHARS_PER_TOKEN


def opens_turn(message: Mapping[str, Any]) -> bool:
    """A user message that is not a tool_result carrier: a safe first message."""
    if message.get("role") != "user":
        return False
    content = message.get("content")
    return isinstance(content, str) or not any(block.get("type") == "tool_result" for block in content or ())


def window(messages: list[Mapping[str, Any]], fixed_chars: int, budget_tokens: int,
           ratio: float) -> tuple[int, int]:
    """Index of the first message to send, and the estimated prompt characters: whole turns
    are dropped from the front until the estimate fits; the latest turn is always kept."""
    sizes = [message_chars(m) for m in messages]
    total = fixed_chars + sum(sizes)
    budget_chars = int(budget_tokens * ratio)
    if total <= budget_chars:
        return 0, total
    start = 0  # (no message opens a turn: everything is sent)
    for start in (i for i, m in enumerate(messages) if opens_turn(m)):
        total = fixed_chars + sum(sizes[start:])
        if total <= budget_chars:
            break
    return start, total


def tool_definitions(tools: list[dict[str, Any]], caching: bool) -> list[dict[str, Any]]:
    """The tool definitions to send (copies): with caching, the last one carries a breakpoint
    (tools come first in the prompt: part of every cached prefix)."""
    if caching and tools:
        return [*tools[:-1], {**tools[-1], "cache_control": CACHE}]
    return tools


def with_breakpoints(system: str, messages: list[Mapping[str, Any]],
                     caching: bool) -> tuple[list[dict[str, Any]] | str, list[Mapping[str, Any]]]:
    """Mark the cacheable prefix: system prompt and latest message (a rolling breakpoint the
    next call reads from); with the tools', 3 of the API's 4. Stored messages are copied. The
    breakpoint goes on the message's last block that may carry one: not a thinking block (the API
    refuses `cache_control` there), which a paused answer sent back to be continued can end with."""
    if not caching:
        return system, messages
    system_blocks = [{"type": "text", "text": system, "cache_control": CACHE}] if system else system
    if messages:
        last = messages[-1]
        content = last["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        at = next((i for i in range(len(content) - 1, -1, -1) if content[i].get("type") not in UNCACHEABLE), None)
        if at is not None:
            content = [*content[:at], {**content[at], "cache_control": CACHE}, *content[at + 1:]]
            messages = [*messages[:-1], {**last, "content": content}]
    return system_blocks, messages
