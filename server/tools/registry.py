"""Tool registry: tools are plain Python functions with a pydantic input model, which gives
both the JSON schema advertised to Claude and validation of the arguments Claude sends back,
so a tool function only ever sees clean input."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import GenerateJsonSchema

from .. import metrics


class _Untitled(GenerateJsonSchema):
    """pydantic's JSON Schema without the titles it makes up (noise for the model): not the
    model's, not each field's (a property named "title" stays, being a name)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def model_schema(self, schema: Any) -> Any:
        return {k: v for k, v in super().model_schema(schema).items() if k != "title"}


@dataclass(frozen=True)
class Tool:
    """A callable exposed to Claude; `func` receives the validated input model."""

    name: str
    description: str
    input_model: type[BaseModel]
    func: Callable[[Any], Any]  # sync or async
    timeout_s: float = 10.0

    def definition(self) -> dict[str, Any]:
        """The tool entry for the Anthropic Messages API `tools` list."""
        schema = self.input_model.model_json_schema(schema_generator=_Untitled)
        ordered = {key: schema.pop(key) for key in ("type", "properties", "required") if key in schema}
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
    outcome: str = "ok"  # ok | error | timeout | invalid (as `agent_tool_calls` counts them)
    seconds: float = 0.0  # how long the tool ran (0 when it did not: invalid input)

    def tool_result_block(self) -> dict[str, Any]:
        block = {"type": "tool_result", "tool_use_id": self.tool_use_id, "content": self.output}
        return {**block, "is_error": True} if self.is_error else block


class ToolSet(dict[str, Tool]):
    """The enabled tools by name."""

    def __init__(self, tools: Iterable[Tool]) -> None:
        super().__init__()
        for tool in tools:
            if tool.name in self:
                raise ValueError(f"duplicate tool name {tool.name!r}")
            self[tool.name] = tool
        # Schemas are derived once: pydantic's model_json_schema() is costly per turn.
        self._definitions = [tool.definition() for tool in self.values()]

    def names(self) -> list[str]:
        return list(self)

    def definitions(self) -> list[dict[str, Any]]:
        """The API tool definitions (shared: copy before changing one)."""
        return self._definitions

    def validate(self, name: str, raw_input: object) -> tuple[BaseModel | None, str | None]:
        """Return (model, None) or (None, error message meant for the model: one part per field
        error, phrased so the model can fix its call)."""
        tool = self.get(name)
        if tool is None:
            return None, f"unknown tool {name!r}; available: {', '.join(self) or '(none)'}"
        try:
            return tool.input_model.model_validate(raw_input), None
        except ValidationError as exc:
            parts = []
            for err in exc.errors(include_url=False):
                msg = err["msg"]
                if err["type"] == "value_error" and "error" in err.get("ctx", {}):
                    msg = str(err["ctx"]["error"])  # drop pydantic's "Value error, " prefix
                parts.append(f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {msg}")
            return None, f"invalid input for tool '{name}': " + "; ".join(parts)

    async def run_one(self, tool_use_id: str, name: str, raw_input: object) -> ToolOutcome:
        """Validate and run one call; never raises for tool failures, reports them instead.
        Sync functions run in a thread (not blocking the event loop), abandoned on timeout
        (threads cannot be killed): sync tools should be bounded on their own as well.
        Counted in `agent_tool_calls` by outcome, timed in `agent_tool_duration_seconds`."""
        model, error = self.validate(name, raw_input)
        if model is None:
            metrics.tool_finished(name if name in self else "<unknown>", "invalid")
            return ToolOutcome(tool_use_id, name, error, True, None, "invalid")
        tool = self[name]
        args = model.model_dump(mode="json")
        started = time.monotonic()
        outcome, output = await self._run(tool, model)
        seconds = time.monotonic() - started
        metrics.tool_finished(name, outcome, seconds)
        return ToolOutcome(tool_use_id, name, output, outcome != "ok", args, outcome, seconds)

    @staticmethod
    async def _run(tool: Tool, model: BaseModel) -> tuple[str, str]:
        """(outcome: ok, timeout or error; the tool_result text)."""
        func = tool.func
        awaitable = func(model) if inspect.iscoroutinefunction(func) else asyncio.to_thread(func, model)
        try:
            result = await asyncio.wait_for(awaitable, timeout=tool.timeout_s)
        except asyncio.TimeoutError:
            return "timeout", f"tool {tool.name!r} timed out after {tool.timeout_s:g} s"
        except Exception as exc:  # reported to the model, which may retry differently
            return "error", f"{type(exc).__name__}: {exc}"
        try:  # tool_result content is text; structured results travel as JSON
            return "ok", result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError) as exc:
            return "error", f"tool returned an unserialisable result: {exc}"

    async def run_all(self, calls: list[tuple[str, str, object]]) -> list[ToolOutcome]:
        """Run (tool_use_id, name, input) calls concurrently; results keep call order."""
        return list(await asyncio.gather(*(self.run_one(*call) for call in calls)))
