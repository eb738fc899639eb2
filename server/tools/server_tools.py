"""Server tools (web search, web fetch, code execution): Anthropic runs them, not this server.

We only declare them in the request's `tools` list, with the options the deployment set; their
calls and results come back as content blocks of the model's answer. So they need no code here,
only the versioned `type` the API knows them by and the options each version takes.

The versions are written out (not read from the SDK's type modules, which would slow the cold
start); tests/test_config.py checks them against the pinned SDK's files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Settings

# Every versioned type of these tools that the pinned SDK's ToolUnionParam defines.
KNOWN_TYPES: tuple[str, ...] = (
    "web_search_20250305", "web_search_20260209", "web_search_20260318",
    "web_fetch_20250910", "web_fetch_20260209", "web_fetch_20260309", "web_fetch_20260318",
    "code_execution_20250522", "code_execution_20250825", "code_execution_20260120", "code_execution_20260521",
)
# The version a bare name in SERVER_TOOLS means.
DEFAULT_TYPES: dict[str, str] = {
    "web_search": "web_search_20250305", "web_fetch": "web_fetch_20250910", "code_execution": "code_execution_20250825",
}


def tool_name(tool_type: str) -> str:
    """The tool's name in the API (`web_search_20260318` -> `web_search`)."""
    return tool_type.rpartition("_")[0]


def resolve(entries: tuple[str, ...]) -> tuple[str, ...]:
    """SERVER_TOOLS entries as versioned types, in their order; ValueError for an unknown entry
    or two versions of one tool (the API wants each name once)."""
    types: dict[str, str] = {}
    for entry in entries:
        tool_type = DEFAULT_TYPES.get(entry, entry)
        if tool_type not in KNOWN_TYPES:
            raise ValueError(f"unknown server tool {entry!r}; valid: {', '.join([*DEFAULT_TYPES, *KNOWN_TYPES])}")
        name = tool_name(tool_type)
        if types.setdefault(name, tool_type) != tool_type:
            raise ValueError(f"{entry!r}: {name} is listed twice (as {types[name]!r})")
    return tuple(types.values())


def definitions(settings: "Settings") -> list[dict[str, Any]]:
    """The `tools` entries for SERVER_TOOLS, with only the options that are set."""
    out = []
    for tool_type in settings.server_tools:
        name = tool_name(tool_type)
        tool: dict[str, Any] = {"type": tool_type, "name": name}
        if name == "web_search":
            _common(tool, settings.web_search_max_uses, settings.web_search_allowed_domains,
                    settings.web_search_blocked_domains)
            if settings.web_search_user_location:
                tool["user_location"] = {"type": "approximate", **settings.web_search_user_location}
        elif name == "web_fetch":
            _common(tool, settings.web_fetch_max_uses, settings.web_fetch_allowed_domains,
                    settings.web_fetch_blocked_domains)
            if settings.web_fetch_max_content_tokens:
                tool["max_content_tokens"] = settings.web_fetch_max_content_tokens
            if settings.web_fetch_citations:
                tool["citations"] = {"enabled": True}
        out.append(tool)
    return out


def _common(tool: dict[str, Any], max_uses: int, allowed: tuple[str, ...], blocked: tuple[str, ...]) -> None:
    if max_uses:
        tool["max_uses"] = max_uses
    if allowed:
        tool["allowed_domains"] = list(allowed)
    if blocked:
        tool["blocked_domains"] = list(blocked)
