"""Tools Claude may call. A tool is a function decorated with `@tool` in any importable module:
the built-in ones (calculator, current_time) and those of TOOL_MODULES are loaded at startup;
ENABLED_TOOLS narrows them. See server/tools/functions.py for what a tool function may be."""

from __future__ import annotations

from .functions import FunctionTool, ToolDefinitionError, tool
from .modules import BUILTIN_MODULES, available_tools, load_toolset
from .registry import Tool, ToolOutcome, ToolResult, ToolSet, ToolSource

__all__ = ["BUILTIN_MODULES", "FunctionTool", "Tool", "ToolDefinitionError", "ToolOutcome", "ToolResult", "ToolSet",
           "ToolSource", "available_tools", "load_toolset", "tool"]
