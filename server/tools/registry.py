"""The tool interface the engine runs: a `Tool` (local function, MCP tool, client tool) validates
its input and runs; a `ToolSet` holds the local tools plus `ToolSource`s whose tools change at
runtime (MCP servers), and turns every call into a `ToolOutcome` without ever raising for a
tool's failure (the model is told, and may try again)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .. import metrics

log = logging.getLogger(__name__)

# The Messages API's tool names (match with `fullmatch`: a `$` would let "name\n" through).
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# tool_result content block types the Messages API accepts
CONTENT_BLOCK_TYPES = frozenset({"text", "image", "document", "search_result"})


@dataclass(frozen=True)
class ToolResult:
    """What a tool may return to set its tool_result exactly: text or content blocks
    (e.g. an image), and whether it is an error the model should react to."""

    content: str | list[dict[str, Any]]
    is_error: bool = False


class Tool:
    """A tool the model may call. Subclasses set `name`, `description`, `timeout_s` and implement
    `definition`, `check` and `call`; `check` runs when the call's input is complete (to show
    whether it is valid) and again before `call`, so it should be cheap."""

    name: str
    description: str
    timeout_s: float  # the ToolSet cancels `call` after this long (a timeout outcome)

    def definition(self) -> dict[str, Any]:
        """The entry of the Messages API `tools` list: name, description, input_schema."""
        raise NotImplementedError

    def check(self, raw_input: object) -> tuple[Any, str | None]:
        """(args for `call`, None), or (None, what is wrong, phrased for the model to fix its call)."""
        if not isinstance(raw_input, dict):
            return None, invalid_input(self.name, ["input: Input should be an object"])
        return raw_input, None

    def shown_input(self, args: Any) -> dict[str, Any]:
        """The validated input as JSON, for events and the outcome."""
        return args

    async def call(self, args: Any) -> Any:
        """Run with checked args: str | content blocks | ToolResult | anything JSON-able;
        an exception is reported to the model as an error."""
        raise NotImplementedError


class ToolSource(Protocol):
    """Tools that change at runtime (an MCP server's); `version` changes whenever `tools()` does."""

    version: int

    def tools(self) -> list[Tool]: ...


def invalid_input(name: str, problems: Iterable[str]) -> str:
    """The message for a call whose input does not fit the tool (one part per problem)."""
    return f"invalid input for tool '{name}': " + "; ".join(problems)


@dataclass(frozen=True)
class ToolOutcome:
    """The result of one tool_use, ready to be sent back as a tool_result."""

    tool_use_id: str
    name: str
    output: str | list[dict[str, Any]]  # tool_result content: text, or content blocks
    is_error: bool
    input: dict[str, Any] | None
    outcome: str = "ok"  # ok | error | timeout | invalid (as `agent_tool_calls` counts them)
    seconds: float = 0.0  # how long the tool ran (0 when it did not: invalid input)

    def tool_result_block(self) -> dict[str, Any]:
        block = {"type": "tool_result", "tool_use_id": self.tool_use_id, "content": self.output}
        return {**block, "is_error": True} if self.is_error else block


def json_text(value: Any) -> str:
    """A structured result as the JSON text the model reads; ValueError if it is not JSON-able."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError) as exc:  # (default=str leaves circular references)
        raise ValueError(f"tool returned an unserialisable result: {exc}") from None


def _blocks_problem(blocks: list[Any]) -> str | None:
    """Why a list is not tool_result content blocks (None if it is): caught here, the API would
    refuse the next model call and fail the turn."""
    if not blocks:
        return "no content blocks"
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") not in CONTENT_BLOCK_TYPES:
            return f"block {i} is not a content block of type {', '.join(sorted(CONTENT_BLOCK_TYPES))}"
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            return f"block {i}: a text block needs a string 'text'"
        if block["type"] in ("image", "document") and not isinstance(block.get("source"), dict):
            return f"block {i}: an {block['type']} block needs a 'source' object"
    return None


def _content(result: Any) -> tuple[str, str | list[dict[str, Any]]]:
    """(outcome, tool_result content) of what a tool's `call` returned: a ToolResult as it says,
    text, a list of content blocks, else JSON text."""
    is_error = False
    if isinstance(result, ToolResult):
        content, is_error = result.content, result.is_error
    elif isinstance(result, str) or (isinstance(result, list) and _blocks_problem(result) is None):
        content = result
    else:
        content = json_text(result)
    if isinstance(content, list):
        if (problem := _blocks_problem(content)) is not None:
            return "error", f"tool returned invalid content: {problem}"
    elif not isinstance(content, str):
        return "error", f"tool returned invalid content: {type(content).__name__}, not text or content blocks"
    return ("error" if is_error else "ok"), content


class ToolSet(Mapping[str, Tool]):
    """The tools the model may call, by name: the local ones, then each source's (a source's tool
    whose name is taken is skipped, with one warning). What the model sees is derived once per
    `version`: the per-call cost is a dict lookup and the tool's own validation."""

    def __init__(self, tools: Iterable[Tool], sources: Sequence[ToolSource] = ()) -> None:
        self._local: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self._local:
                raise ValueError(f"duplicate tool name {tool.name!r}")
            self._local[tool.name] = tool
        self._sources = tuple(sources)
        self._warned: set[tuple[int, str]] = set()  # (source index, name) skipped for a clash
        self._built: tuple[int, ...] | None = None
        self._current: dict[str, Tool] = {}
        self._definitions: list[dict[str, Any]] = []
        self._refresh(self.version)

    def with_sources(self, *sources: ToolSource) -> ToolSet:
        """These local tools plus `sources` (after any this set has)."""
        return ToolSet(self._local.values(), (*self._sources, *sources))

    @property
    def version(self) -> tuple[int, ...]:
        """Changes when a source's tools change (then re-encode what is sent to the model)."""
        return tuple(source.version for source in self._sources)

    def _refresh(self, version: tuple[int, ...]) -> None:
        current = dict(self._local)
        for index, source in enumerate(self._sources):
            for tool in source.tools():
                if tool.name in current:
                    if (index, tool.name) not in self._warned:
                        self._warned.add((index, tool.name))
                        log.warning("tool %r of %s is skipped: the name is taken by another tool",
                                    tool.name, type(source).__name__)
                    continue
                current[tool.name] = tool
        definitions = [tool.definition() for tool in current.values()]
        self._current, self._definitions, self._built = current, definitions, version

    def current(self) -> Mapping[str, Tool]:
        """Name -> tool, as of now."""
        if self._sources and (version := self.version) != self._built:
            self._refresh(version)
        return self._current

    def tools(self) -> list[Tool]:
        """The current tools (so a ToolSet can serve as another's source)."""
        return list(self.current().values())

    def __getitem__(self, name: str) -> Tool:
        return self.current()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.current())

    def __len__(self) -> int:
        return len(self.current())

    def __contains__(self, name: object) -> bool:
        return name in self.current()

    def names(self) -> list[str]:
        return list(self.current())

    def definitions(self) -> list[dict[str, Any]]:
        """The API tool definitions (shared: copy before changing one)."""
        self.current()
        return self._definitions

    def validate(self, name: str, raw_input: object) -> tuple[Any, str | None]:
        """(args, None) or (None, what is wrong, for the model: one part per problem)."""
        tool = (self.current() if self._sources else self._current).get(name)
        return self._unknown(name) if tool is None else tool.check(raw_input)

    def _unknown(self, name: str) -> tuple[None, str]:
        return None, f"unknown tool {name!r}; available: {', '.join(self.current()) or '(none)'}"

    async def run_one(self, tool_use_id: str, name: str, raw_input: object) -> ToolOutcome:
        """Validate and run one call; never raises for tool failures, reports them instead.
        Counted in `agent_tool_calls` by outcome, timed in `agent_tool_duration_seconds`."""
        tool = (self.current() if self._sources else self._current).get(name)
        args, error = self._unknown(name) if tool is None else tool.check(raw_input)
        if tool is None or error is not None:
            metrics.tool_finished(name if tool is not None else "<unknown>", "invalid")
            return ToolOutcome(tool_use_id, name, error or "invalid input", True, None, "invalid")
        shown = tool.shown_input(args)
        started = time.monotonic()
        outcome, output = await self._run(tool, args)
        seconds = time.monotonic() - started
        metrics.tool_finished(name, outcome, seconds)
        return ToolOutcome(tool_use_id, name, output, outcome != "ok", shown, outcome, seconds)

    @staticmethod
    async def _run(tool: Tool, args: Any) -> tuple[str, str | list[dict[str, Any]]]:
        """(outcome: ok, error or timeout; the tool_result content)."""
        try:
            result = await asyncio.wait_for(tool.call(args), timeout=tool.timeout_s)
        except asyncio.TimeoutError:
            return "timeout", f"tool {tool.name!r} timed out after {tool.timeout_s:g} s"
        except Exception as exc:  # reported to the model, which may retry differently
            return "error", f"{type(exc).__name__}: {exc}"
        try:
            return _content(result)
        except ValueError as exc:
            return "error", str(exc)

    async def run_all(self, calls: list[tuple[str, str, object]]) -> list[ToolOutcome]:
        """Run (tool_use_id, name, input) calls concurrently; results keep call order."""
        return list(await asyncio.gather(*(self.run_one(*call) for call in calls)))
