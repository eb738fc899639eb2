"""Tools Claude may call. To add one: write a module with an input model, a
function and `TOOL = Tool(...)`, then list it in ALL_TOOLS below."""

from __future__ import annotations

from collections.abc import Iterable

from . import calculator, current_time
from .registry import Tool, ToolSet

ALL_TOOLS: dict[str, Tool] = {tool.name: tool for tool in (calculator.TOOL, current_time.TOOL)}


def load_toolset(enabled: Iterable[str]) -> ToolSet:
    """Build the ToolSet for the configured names; unknown names are a config error."""
    names = list(dict.fromkeys(enabled))  # dedupe, keep order
    unknown = [name for name in names if name not in ALL_TOOLS]
    if unknown:
        raise ValueError(f"unknown tool(s): {', '.join(map(repr, unknown))}; available: {', '.join(ALL_TOOLS)}")
    return ToolSet(ALL_TOOLS[name] for name in names)
