"""TOOL_MODULES: importing the modules that define `@tool` functions, and the ToolSet of the
enabled ones. Every problem is a ValueError whose message starts with the variable to fix
(TOOL_MODULES or ENABLED_TOOLS) and names the module and tool, so startup fails saying why."""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Iterable

from .functions import FunctionTool, ToolDefinitionError, forget, registered
from .registry import ToolSet

# The tools that ship with the server: modules like any other, always loaded.
BUILTIN_MODULES: tuple[str, ...] = ("server.tools.calculator", "server.tools.current_time")


def _import(module: str) -> None:
    try:
        importlib.import_module(module)
    except ToolDefinitionError as exc:
        forget(module)
        raise ValueError(f"TOOL_MODULES: {exc}") from None
    except ImportError as exc:
        forget(module)
        raise ValueError(f"TOOL_MODULES: cannot import module {module!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # the module's own code failed: say where
        forget(module)
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise ValueError(f"TOOL_MODULES: importing module {module!r} failed: {type(exc).__name__}: {exc} "
                         f"({frame.filename}:{frame.lineno})") from None


def available_tools(modules: Iterable[str] = ()) -> dict[str, FunctionTool]:
    """Every tool of the built-in modules, then of `modules` (imported now), by name in order;
    ValueError for a module that cannot be imported, defines no tool, or a name two modules use."""
    tools: dict[str, FunctionTool] = {}
    origin: dict[str, str] = {}
    for module in dict.fromkeys((*BUILTIN_MODULES, *modules)):
        if not module or not all(part.isidentifier() for part in module.split(".")):
            raise ValueError(f"TOOL_MODULES: {module!r} is not a module name (dotted, e.g. myapp.tools)")
        _import(module)
        found = registered(module)
        if not found:
            raise ValueError(f"TOOL_MODULES: module {module!r} defines no tool (decorate functions with "
                             "@tool, from server.tools)")
        for name, defined in found.items():
            if name in tools and tools[name] is not defined:
                raise ValueError(f"TOOL_MODULES: tool {name!r} is defined by both module {origin[name]!r} and "
                                 f"module {module!r} (tool names must be unique; rename one with "
                                 "@tool(name=...))")
            tools[name], origin[name] = defined, module
    return tools


def load_toolset(enabled: Iterable[str] | None, modules: Iterable[str] = (),
                 default_timeout: float = 10.0) -> ToolSet:
    """The ToolSet of the local tools: `enabled` names in that order (None: every tool of the
    built-in modules and `modules`). `default_timeout` (TOOL_TIMEOUT_SECONDS) applies to tools
    whose @tool sets none."""
    tools = available_tools(modules)
    if enabled is None:
        chosen = list(tools.values())
    else:
        names = list(dict.fromkeys(enabled))  # dedupe, keep order
        unknown = [name for name in names if name not in tools]
        if unknown:
            raise ValueError(f"ENABLED_TOOLS: unknown tool(s): {', '.join(map(repr, unknown))}; "
                             f"available: {', '.join(tools)}")
        chosen = [tools[name] for name in names]
    return ToolSet(t if t.own_timeout else t.with_timeout(default_timeout) for t in chosen)
