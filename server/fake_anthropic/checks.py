"""What the fake refuses in a well-formed ``/v1/messages`` body, worded as the API words it (a 400
``invalid_request_error``): the thinking configuration and effort, server tool options, and the
history's shape — tool_use/tool_result pairing, thinking signatures, the thinking a tool loop must
start with, cache_control where it cannot go, document sources.

One walk over the messages; a message whose content is a string costs a type check.
"""

from __future__ import annotations

import binascii
from typing import Any

from . import catalog
from .signing import sealed, signed

THINKING_TYPES = ("adaptive", "between_tools", "disabled", "enabled")
THINKING_DOCS = "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
INTERLEAVED_BETA = "interleaved-thinking-2025-05-14"
_THINKING = ("thinking", "redacted_thinking")
_PDF_MAGIC = "JVBERi"  # base64 of "%PDF"


def _tags(names: tuple[str, ...]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def problem(body: dict[str, Any], models: dict[str, dict[str, Any]], beta: str = "") -> str | None:
    """Why the API refuses ``body`` (already known to have a model, max_tokens and messages); None if not.
    ``models`` is the fake's model table, ``beta`` the request's ``anthropic-beta`` header."""
    thinking = body.get("thinking")
    output = body.get("output_config")
    if thinking is not None or isinstance(output, dict) and output.get("effort") is not None:
        if found := _thinking_config(body, thinking, output, models, INTERLEAVED_BETA in beta):
            return found
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            if isinstance(tool, dict) and tool.get("allowed_domains") is not None \
                    and tool.get("blocked_domains") is not None:
                return f"tools.{i}.{tool.get('type')}: Cannot specify both allowed_domains and blocked_domains " \
                       "in the same request"
    system = body.get("system")
    if isinstance(system, list):
        for j, block in enumerate(system):
            if isinstance(block, dict) and "cache_control" in block and block.get("text") == "":
                return f"system.{j}.text: cache_control cannot be set for empty text blocks"
    thinks = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    return _history(body["messages"], thinks)


def _thinking_config(body: dict[str, Any], thinking: Any, output: Any, models: dict[str, dict[str, Any]],
                     interleaved: bool) -> str | None:
    kind = None
    if thinking is not None:
        if not isinstance(thinking, dict):
            return "thinking: Input should be a valid dictionary or object to extract fields from"
        kind = thinking.get("type")
        if "type" not in thinking:
            return "thinking: Unable to extract tag using discriminator 'type'"
        if kind not in THINKING_TYPES:
            return f"thinking: Input tag '{kind}' found using 'type' does not match any of the expected tags: " \
                   + _tags(THINKING_TYPES)
        if kind == "enabled":
            budget = thinking.get("budget_tokens")
            if budget is None:
                return "thinking.enabled.budget_tokens: Field required"
            if not isinstance(budget, int) or isinstance(budget, bool):
                return "thinking.enabled.budget_tokens: Input should be a valid integer"
            if budget < 1024:
                return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
            if budget >= body["max_tokens"] and not interleaved:
                return "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our " \
                       f"documentation at {THINKING_DOCS}#max-tokens-and-context-window-size"
        if kind in ("enabled", "adaptive") and thinking.get("display") not in (None, "summarized", "omitted"):
            return f"thinking.{kind}.display: Input should be 'summarized' or 'omitted'"
    effort = output.get("effort") if isinstance(output, dict) else None
    if effort is not None and effort not in catalog.EFFORT_LEVELS:
        return "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'"
    info = catalog.model_info(body["model"], models)
    if info is None:  # a model the fake does not know takes everything
        return None
    caps = info["capabilities"]
    if kind is not None and not caps["thinking"]["types"][kind]["supported"]:
        if kind == "adaptive":
            return "adaptive thinking is not supported on this model"
        return f'"thinking.type.{kind}" is not supported for this model.' + (
            ' Use "thinking.type.adaptive" and "output_config.effort" to control thinking behavior.'
            if kind == "enabled" else "")
    if effort is not None:
        if not caps["effort"]["supported"]:
            return "This model does not support the effort parameter."
        if not (caps["effort"].get(effort) or {}).get("supported"):
            return f"output_config.effort: '{effort}' is not supported by this model. Supported values: " \
                   + _tags(tuple(e for e in catalog.EFFORT_LEVELS if (caps["effort"].get(e) or {}).get("supported")))
    return None


def _history(messages: list[Any], thinks: bool) -> str | None:
    """The messages' problems, in order. Consecutive messages of one role count as one (the API merges them)."""
    uses: dict[str, int] = {}  # the current assistant run's tool_use ids -> their message
    asked: dict[str, int] = {}  # in a user run: the previous assistant run's, waiting for their results
    answered: set[str] = set()
    role = None
    results = False  # whether the current user run holds tool results (it continues the turn)
    turn_start = 0  # the turn's first assistant message: the one after a user run without results
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        now = msg.get("role")
        if now != role:
            if now == "assistant":
                if asked and (found := _unanswered(asked, answered)):
                    return found
                if role is None or not results:
                    turn_start = i
                uses = {}
            elif now == "user":
                asked, answered, results = uses, set(), False
            role = now
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                if "cache_control" in block and block.get("text") == "":
                    return f"messages.{i}.content.{j}.text: cache_control cannot be set for empty text blocks"
            elif now == "user":
                if kind == "tool_result":
                    results = True
                    tool_use_id = block.get("tool_use_id")
                    if tool_use_id not in asked:
                        return f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: " \
                               f"{tool_use_id}. Each `tool_result` block must have a corresponding `tool_use` " \
                               "block in the previous message."
                    answered.add(tool_use_id)
                elif kind == "document":
                    if found := _document(block.get("source"), f"messages.{i}.content.{j}"):
                        return found
            elif now == "assistant":
                if kind == "tool_use":
                    uses.setdefault(str(block.get("id")), i)
                elif kind in _THINKING:
                    if found := _thinking_block(block, kind, f"messages.{i}.content.{j}"):
                        return found
    if role != "user":
        return None  # (a trailing assistant message is a prefill or a pause_turn continuation)
    if asked and (found := _unanswered(asked, answered)):
        return found
    return _starts_with_thinking(messages[turn_start], turn_start) if thinks and results else None


def _unanswered(asked: dict[str, int], answered: set[str]) -> str | None:
    missing = [tool_use_id for tool_use_id in asked if tool_use_id not in answered]
    if not missing:
        return None
    return f"messages.{asked[missing[0]]}: `tool_use` ids were found without `tool_result` blocks immediately " \
           f"after: {', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block " \
           "in the next message."


def _thinking_block(block: dict[str, Any], kind: str, path: str) -> str | None:
    if "cache_control" in block:
        return f"{path}.{kind}.cache_control: Extra inputs are not permitted"
    if kind == "redacted_thinking":
        return None if sealed(block.get("data")) else f"{path}: Invalid `data` in `redacted_thinking` block"
    signature = block.get("signature")
    if not isinstance(signature, str):
        return f"{path}.thinking.signature: Field required"
    return None if signed(block.get("thinking"), signature) else f"{path}: Invalid `signature` in `thinking` block"


def _starts_with_thinking(msg: dict[str, Any], i: int) -> str | None:
    content = msg.get("content")
    first = content[0] if isinstance(content, list) and content else None
    kind = first.get("type") if isinstance(first, dict) else "text"
    if kind in _THINKING:
        return None
    return f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{kind}`. When " \
           "`thinking` is enabled, a final `assistant` message must start with a thinking block (preceeding the " \
           "lastmost set of `tool_use` and `tool_result` blocks). We recommend you include thinking blocks from " \
           "previous turns. To avoid this requirement, disable `thinking`. Please consult our documentation at " \
           + THINKING_DOCS


def _document(source: Any, path: str) -> str | None:
    if not isinstance(source, dict):
        return f"{path}.document.source: Field required"
    kind = source.get("type")
    if kind == "base64":
        if source.get("media_type") != "application/pdf":
            return f"{path}.document.source.base64.media_type: Input should be 'application/pdf'"
        data = source.get("data")
        try:
            valid = isinstance(data, str) and data.startswith(_PDF_MAGIC) \
                and len(binascii.a2b_base64(data, strict_mode=True)) > 4
        except (binascii.Error, ValueError):
            valid = False
        return None if valid else f"{path}.pdf.source.base64.data: The PDF specified was not valid."
    if kind == "text":
        if source.get("media_type") != "text/plain":
            return f"{path}.document.source.text.media_type: Input should be 'text/plain'"
        return None if isinstance(source.get("data"), str) else \
            f"{path}.document.source.text.data: Input should be a valid string"
    if kind == "url":
        url = source.get("url")
        ok = isinstance(url, str) and url.split("://", 1)[0] in ("http", "https") and len(url.split("://", 1)) == 2 \
            and url.split("://", 1)[1].split("/", 1)[0] != ""
        return None if ok else f"{path}.document.source.url.url: Input should be a valid URL"
    if kind in ("content", "file"):
        return None
    return f"{path}.document.source: Input tag '{kind}' found using 'type' does not match any of the expected tags: " \
           + _tags(("base64", "content", "file", "text", "url"))
