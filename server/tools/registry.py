"""Tool registry: tools are plain Python functions with a pydantic input model.

The model gives us both the JSON schema advertised to Claude and validation of
the arguments Claude sends back, so a tool function only ever sees clean input.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

ToolFunc = Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]

# Keys whose values are data, not sub-schemas: never strip "title" inside them.
_DATA_KEYS = frozenset({"default", "enum", "const", "examples"})
# Keys whose values map arbitrary names (which may be "title") to sub-schemas.
_NAMED_SCHEMA_KEYS = frozenset({"properties", "$defs", "definitions", "patternProperties"})


def _clean_schema(schema: Any) -> Any:
    """Drop pydantic's auto-generated "title" keys; they are noise for the model."""
    if isinstance(schema, list):
        return [_clean_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    cleaned: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title":
            continue
        if key in _DATA_KEYS:
            cleaned[key] = value
        elif key in _NAMED_SCHEMA_KEYS and isinstance(value, dict):
            cleaned[key] = {name: _clean_schema(sub) for name, sub in value.items()}
        else:
            cleaned[key] = _clean_schema(value)
    return cleaned


def format_validation_error(tool_name: str, error: ValidationError) -> str:
    """One line per field error, phrased so the model can fix its call."""
    parts = []
    for err in error.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "input"
        msg = err["msg"]
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # drop pydantic's "Value error, " prefix
        parts.append(f"{loc}: {msg}")
    return f"invalid input for tool '{tool_name}': " + "; ".join(parts)


@dataclass(frozen=True)
class Tool:
    """A callable exposed to Claude; `func` receives the validated input model."""

    name: str
    description: str
    input_model: type[BaseModel]
    func: ToolFunc
    timeout_s: float = 10.0

    def definition(self) -> dict[str, Any]:
        """The tool entry for the Anthropic Messages API `tools` list."""
        schema = _clean_schema(self.input_model.model_json_schema())
        schema.pop("type", None)
        ordered = {"type": "object", "properties": schema.pop("properties", {})}
        if required := schema.pop("required", None):
            ordered["required"] = required
        return {"name": self.name, "description": self.description,
                "input_schema": {**ordered, **schema}}  # then e.g. additionalProperties, $defs


@dataclass(frozen=True)
class ToolOutcome:
    """The result of one tool_use, ready to be sent back as a tool_result."""

    tool_use_id: str
    name: str
    output: str
    is_error: bool
    input: dict[str, Any] | None

    def tool_result_block(self) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": self.tool_use_id, "content": self.output}
        if self.is_error:
            block["is_error"] = True
        return block


def _to_text(result: Any) -> str:
    """tool_result content is text; structured results travel as JSON."""
    if isinstance(result, str):
        return result
    return json.dumps(result, ensure_ascii=False, default=str)


class ToolSet:
    """The enabled tools, looked up by name."""

    def __init__(self, tools: Iterable[Tool]) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ValueError(f"duplicate tool name {tool.name!r}")
            self._tools[tool.name] = tool
        # Schemas are derived once: pydantic's model_json_schema() is costly per turn.
        self._definitions = [tool.definition() for tool in self._tools.values()]

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return list(self._tools)

    def definitions(self) -> list[dict[str, Any]]:
        """The API tool definitions (shared: copy before changing one)."""
        return self._definitions

    def validate(self, name: str, raw_input: object) -> tuple[BaseModel | None, str | None]:
        """Return (model, None) or (None, error message meant for the model)."""
        tool = self._tools.get(name)
        if tool is None:
            available = ", ".join(self._tools) or "(none)"
            return None, f"unknown tool {name!r}; available: {available}"
        try:
            return tool.input_model.model_validate(raw_input), None
        except ValidationError as exc:
            return None, format_validation_error(name, exc)

    async def run_one(self, tool_use_id: str, name: str, raw_input: object) -> ToolOutcome:
        """Validate and run one call; never raises for tool failures, reports them instead.

        Sync functions run in a worker thread so they cannot block the event loop;
        on timeout such a thread is abandoned (Python threads cannot be killed),
        so sync tools should be bounded on their own as well.
        """
        model, error = self.validate(name, raw_input)
        if model is None:
            return ToolOutcome(tool_use_id, name, error or "invalid input", True, None)
        tool = self._tools[name]
        args = model.model_dump(mode="json")
        is_async = inspect.iscoroutinefunction(tool.func)
        awaitable = tool.func(model) if is_async else asyncio.to_thread(tool.func, model)
        try:
            result = await asyncio.wait_for(awaitable, timeout=tool.timeout_s)
        except asyncio.TimeoutError:
            return ToolOutcome(tool_use_id, name, f"tool {name!r} timed out after {tool.timeout_s:g} s", True, args)
        except Exception as exc:  # reported to the model, which may retry differently
            return ToolOutcome(tool_use_id, name, f"{type(exc).__name__}: {exc}", True, args)
        try:
            return ToolOutcome(tool_use_id, name, _to_text(result), False, args)
        except (TypeError, ValueError) as exc:
            return ToolOutcome(tool_use_id, name, f"tool returned an unserialisable result: {exc}", True, args)

    async def run_all(self, calls: list[tuple[str, str, object]]) -> list[ToolOutcome]:
        """Run (tool_use_id, name, input) calls concurrently; results keep call order."""
        return list(await asyncio.gather(*(self.run_one(*call) for call in calls)))
