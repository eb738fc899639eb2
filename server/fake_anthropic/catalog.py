"""The fake's Models API: ``GET /v1/models/{model_id}`` answers and the capabilities requests are checked against.

Known models are the pinned SDK's ``Model`` ids plus the fake instance's own table (``FakeAnthropic.models``:
id -> fields deep-merged into the generated ModelInfo). An alias resolves to its dated id, as the API does.
Capabilities follow the API's: the ``-4-5`` models take neither adaptive thinking nor effort, except
Claude Opus 4.5 (effort low/medium/high); the others take everything.
"""

from __future__ import annotations

import re
from typing import Any

# anthropic.types.Model's literal ids (SDK 2.12)
SDK_MODELS = (
    "claude-fable-5-2", "claude-mythos-5-2", "claude-haiku-5-5", "claude-sonnet-5-5", "claude-fable-5-1",
    "claude-opus-5-5", "claude-mythos-5-1", "claude-sonnet-5", "claude-fable-5", "claude-mythos-5", "claude-opus-5",
    "claude-opus-4-8", "claude-opus-4-7", "claude-mythos-preview", "claude-opus-4-6", "claude-sonnet-4-6",
    "claude-haiku-4-5", "claude-haiku-4-5-20251001", "claude-opus-4-5", "claude-opus-4-5-20251101",
    "claude-sonnet-4-5", "claude-sonnet-4-5-20250929",
)
LINES = ("haiku", "sonnet", "opus", "fable", "mythos")
EFFORT_LEVELS = ("low", "medium", "high", "xhigh", "max")
_DATED = re.compile(r"^(.*)-(\d{4})(\d{2})(\d{2})$")


def _yes(flag: bool) -> dict[str, bool]:
    return {"supported": flag}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def capabilities(model_id: str) -> dict[str, Any]:
    """Every key of the SDK's ModelCapabilities, for a known model."""
    older = "-4-5" in model_id
    efforts = (("low", "medium", "high") if model_id.startswith("claude-opus-4-5")
               else () if older else EFFORT_LEVELS)
    return {
        "batch": _yes(True), "citations": _yes(True), "code_execution": _yes(True),
        "context_management": {"supported": True, "clear_thinking_20251015": _yes(True),
                               "clear_tool_uses_20250919": _yes(True), "compact_20260112": _yes(True)},
        "effort": {"supported": bool(efforts), **{level: _yes(level in efforts) for level in EFFORT_LEVELS}},
        "image_input": _yes(True), "pdf_input": _yes(True),
        "server_tools": {"supported": True, "code_execution": _yes(True), "web_search": _yes(True)},
        "structured_outputs": _yes(True),
        "thinking": {"supported": True, "types": {"adaptive": _yes(not older), "between_tools": _yes(True),
                                                  "disabled": _yes(True), "enabled": _yes(True)}},
    }


def resolve(model_id: str, table: dict[str, dict[str, Any]]) -> str | None:
    """The id a request's model names (an alias -> its dated id), None if the fake does not know it."""
    known = [*SDK_MODELS, *table]
    dated = sorted(m for m in known if (d := _DATED.match(m)) and d.group(1) == model_id)
    if dated:
        return dated[-1]
    return model_id if model_id in known else None


def model_info(model_id: str, table: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The ModelInfo the API answers for ``model_id``; None (a 404) if the fake does not know it."""
    found = resolve(model_id, table)
    if found is None:
        return None
    date = _DATED.match(found)
    name = date.group(1) if date else found
    words = name.removeprefix("claude-").split("-")
    numbers = [w for w in words if w.isdigit()]
    display = " ".join(["Claude", *(w.capitalize() for w in words if not w.isdigit()), *([".".join(numbers)]
                                                                                       if numbers else [])])
    info = {
        "type": "model", "id": found, "display_name": display,
        "created_at": f"{date.group(2)}-{date.group(3)}-{date.group(4)}T00:00:00Z" if date else "1970-01-01T00:00:00Z",
        "lifecycle": "active", "deprecated_at": None, "retires_at": None,
        "line": next((w for w in words if w in LINES), None),
        "max_input_tokens": 200_000, "max_tokens": 64_000,
        "capabilities": capabilities(found),
    }
    for key in dict.fromkeys((name, model_id, found)):  # the table's entries for the alias and the dated id
        if key in table:
            info = _merge(info, table[key])
    return info
