"""Tool modules (TOOL_MODULES, `@tool`) and the ToolSet's interface for tools of other kinds
(ToolSource: tools that change at runtime). The end-to-end tests run real servers loading
tests/tool_modules/ and the fake model calling their tools; every startup error is checked
through Settings.from_env, and one through `python -m server`."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from pydantic import Field

from server.config import ConfigError, Settings
from server.tools import FunctionTool, Tool, ToolDefinitionError, ToolResult, ToolSet, load_toolset, tool
from server.tools.functions import description_of

from .harness import sse_turn

ROOT = Path(__file__).resolve().parents[1]
WEATHER = "tests.tool_modules.weather"
KIT = "tests.tool_modules.kit"
BAD = "tests.tool_modules.bad."
WEATHER_TOOLS = ["forecast", "search", "slow-echo", "red_dot", "refuse", "explode", "shadowing"]


def strip_cache(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in b.items() if k != "cache_control"} for b in blocks]


# --- @tool --------------------------------------------------------------------------------------


def test_schema_from_a_typed_signature() -> None:
    from .tool_modules import weather

    assert weather.forecast("Oslo") == {"city": "Oslo", "days": 1, "unit": "C", "sky": "clear", "high": 21}
    definition = weather.forecast.tool.definition()  # type: ignore[attr-defined]
    assert definition == {
        "name": "forecast",
        "description": "Weather forecast for a city.\n\nMade up, deterministic: for tests.",
        "input_schema": {
            "type": "object",
            "properties": {
                "city": {"description": "City name, e.g. 'Paris'", "minLength": 1, "type": "string"},
                "days": {"default": 1, "maximum": 7, "minimum": 1, "type": "integer"},
                "unit": {"default": "C", "enum": ["C", "F"], "type": "string"},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    }


def test_schema_from_a_pydantic_model_parameter() -> None:
    from .tool_modules import weather

    schema = weather.search.tool.definition()["input_schema"]  # type: ignore[attr-defined]
    assert schema == {"type": "object", "properties": {
        "term": {"description": "What to look for", "minLength": 1, "type": "string"},
        "limit": {"default": 2, "maximum": 5, "minimum": 1, "type": "integer"}},
        "required": ["term"], "additionalProperties": False}


def test_decorator_options_and_no_parameters() -> None:
    from .tool_modules import weather

    echo = weather.slow_echo.tool  # type: ignore[attr-defined]
    assert (echo.name, echo.description, echo.timeout_s) == ("slow-echo", "Echo the text after a delay (async).", 0.5)
    assert weather.red_dot.tool.definition()["input_schema"] == {  # type: ignore[attr-defined]
        "type": "object", "properties": {}, "additionalProperties": False}


def test_description_joins_wrapped_lines_and_keeps_lists() -> None:
    doc = """Look things up
        in the catalogue.

        Modes:
        - exact: the whole title
        - prefix: its start

        Slow on big catalogues."""
    assert description_of(doc) == ("Look things up in the catalogue.\n\nModes:\n- exact: the whole title\n"
                                   "- prefix: its start\n\nSlow on big catalogues.")


@pytest.mark.asyncio
async def test_calls_validate_and_run() -> None:
    tools = load_toolset(None, [WEATHER, KIT])
    assert tools.names() == ["calculator", "current_time", *WEATHER_TOOLS, "roll"]
    ok = await tools.run_one("1", "forecast", {"city": "Paris", "days": 3})
    assert not ok.is_error and ok.input == {"city": "Paris", "days": 3, "unit": "C"}
    assert ok.output == '{"city": "Paris", "days": 3, "unit": "C", "sky": "clear", "high": 21}'
    found = await tools.run_one("2", "search", {"term": "tea"})
    assert found.output == '["tea #1", "tea #2"]'  # (a list from a function is data: JSON)
    bad = await tools.run_one("3", "forecast", {"days": 9, "wind": True})
    assert bad.is_error and bad.outcome == "invalid" and bad.input is None
    assert bad.output == ("invalid input for tool 'forecast': city: Field required; "
                          "days: Input should be less than or equal to 7; wind: Extra inputs are not permitted")
    shadow = await tools.run_one("4", "shadowing", {"json": "j", "schema": 2, "model_config": True})
    assert shadow.input == {"json": "j", "schema": 2, "model_config": True}
    assert shadow.output == '{"json": "j", "schema": 2, "model_config": true}'
    image = await tools.run_one("5", "red_dot", {})
    assert not image.is_error and [b["type"] for b in image.output] == ["text", "image"]
    assert image.tool_result_block()["content"] == image.output
    refused = await tools.run_one("6", "refuse", {"reason": "no"})
    assert refused.is_error and refused.outcome == "error" and refused.output == "refused: no"
    assert refused.input == {"reason": "no"}
    exploded = await tools.run_one("7", "explode", {"message": "boom"})
    assert exploded.output == "RuntimeError: boom" and exploded.outcome == "error"
    slow = await tools.run_one("8", "slow-echo", {"text": "hi", "delay": 5})
    assert slow.outcome == "timeout" and slow.output == "tool 'slow-echo' timed out after 0.5 s"
    assert (await tools.run_one("9", "roll", {"sides": 20})).output == "20"


def test_timeouts_come_from_the_decorator_or_the_deployment() -> None:
    tools = load_toolset(None, [WEATHER, KIT], default_timeout=3)
    timeouts = {name: tools[name].timeout_s for name in tools}
    assert timeouts["calculator"] == timeouts["current_time"] == 5  # (the built-ins set theirs)
    assert timeouts["slow-echo"] == 0.5 and timeouts["roll"] == 2
    assert timeouts["forecast"] == timeouts["search"] == 3
    assert load_toolset(None, [WEATHER])["forecast"].timeout_s == 10  # (TOOL_TIMEOUT_SECONDS' default)


def test_bad_definitions_raise_at_decoration() -> None:
    with pytest.raises(ToolDefinitionError, match=r"tool 'kw': parameter 'rest': \*args, \*\*kwargs"):
        @tool
        def kw(**rest: int) -> None:
            """Keyword arguments."""
    with pytest.raises(ToolDefinitionError, match="the name must be 1 to 64"):
        tool(name="x" * 65)(lambda: None)
    with pytest.raises(ToolDefinitionError, match="the name must be 1 to 64"):
        tool(name="trailing_newline\n")(lambda: None)  # (the API would refuse it: not a `$` match)
    with pytest.raises(ToolDefinitionError, match="applies to a plain def"):
        tool(name="callable_object", description="An object.")(FunctionTool)  # type: ignore[arg-type]
    with pytest.raises(ToolDefinitionError, match="positional-only"):
        @tool
        def positional(a: int, /) -> int:
            """Positional-only."""
            return a


def test_a_description_may_replace_the_docstring() -> None:
    @tool(description="Say hello to someone.", name="hello_there")
    def hello(who: Annotated[str, Field(description="Their name")] = "world") -> str:
        return f"hello {who}"

    assert hello() == "hello world"
    assert hello.tool.definition()["description"] == "Say hello to someone."  # type: ignore[attr-defined]


# --- TOOL_MODULES and ENABLED_TOOLS at startup -------------------------------------------------------


def test_enabled_tools_default_is_every_tool() -> None:
    assert load_toolset(None).names() == ["calculator", "current_time"]
    assert Settings.from_env({"TOOL_MODULES": f"{WEATHER},{KIT}"}).tool_modules == (WEATHER, KIT)
    assert load_toolset(["roll", "forecast"], [WEATHER, KIT]).names() == ["roll", "forecast"]
    assert not load_toolset([], [WEATHER])
    # a listed built-in module, or a module listed twice, is loaded once
    assert load_toolset(None, ["server.tools.calculator", WEATHER, WEATHER]).names() == [
        "calculator", "current_time", *WEATHER_TOOLS]


@pytest.mark.parametrize(("module", "message"), [
    ("no_docstring", "TOOL_MODULES: module '{m}', tool 'mystery': no description: write a docstring"),
    ("untyped", "TOOL_MODULES: module '{m}', tool 'add': parameter 'b' has no type annotation"),
    ("bad_name", "TOOL_MODULES: module '{m}', tool 'look up': the name must be 1 to 64 characters"),
    ("varargs", "TOOL_MODULES: module '{m}', tool 'total': parameter 'numbers': *args"),
    ("twice", "TOOL_MODULES: module '{m}', tool 'lookup': defined twice in the module (lookup and lookup_again)"),
    ("unknown_type", "TOOL_MODULES: module '{m}', tool 'wait': cannot build an input model from the signature: "
                     "PydanticSchemaGenerationError"),
    ("unresolved", "TOOL_MODULES: module '{m}', tool 'fetch': cannot resolve the type annotations: NameError: "
                   "name 'Url' is not defined"),
    ("bad_timeout", "TOOL_MODULES: module '{m}', tool 'instant': timeout must be a number of seconds"),
    ("no_tools", "TOOL_MODULES: module '{m}' defines no tool"),
    ("raises", "TOOL_MODULES: importing module '{m}' failed: ZeroDivisionError: division by zero ("),
    ("missing_dependency", "TOOL_MODULES: cannot import module '{m}': ModuleNotFoundError: No module named "
                           "'no_such_package_for_tools'"),
    ("clash_builtin", "TOOL_MODULES: tool 'calculator' is defined by both module 'server.tools.calculator' and "
                      "module '{m}'"),
    ("does_not_exist", "TOOL_MODULES: cannot import module '{m}': ModuleNotFoundError"),
])
def test_startup_errors_name_the_variable_module_and_tool(module: str, message: str) -> None:
    name = BAD + module
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"TOOL_MODULES": name})
    assert str(caught.value).startswith(message.format(m=name)), str(caught.value)
    assert "\n" not in str(caught.value)


def test_startup_error_for_two_modules_defining_one_name() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"TOOL_MODULES": f"{BAD}clash_a, {BAD}clash_b"})
    assert str(caught.value) == (f"TOOL_MODULES: tool 'lookup' is defined by both module '{BAD}clash_a' and module "
                                 f"'{BAD}clash_b' (tool names must be unique; rename one with @tool(name=...))")


def test_startup_error_for_a_malformed_module_name() -> None:
    with pytest.raises(ConfigError, match=r"^TOOL_MODULES: 'tests/tool_modules' is not a module name"):
        Settings.from_env({"TOOL_MODULES": "tests/tool_modules"})


def test_unknown_enabled_tool_lists_the_module_tools() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"TOOL_MODULES": KIT, "ENABLED_TOOLS": "roll,dice"})
    assert str(caught.value) == "ENABLED_TOOLS: unknown tool(s): 'dice'; available: calculator, current_time, roll"


def test_python_m_server_refuses_a_bad_tool_module() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "REDIS_"))}
    env.update(PORT="0", TOOL_MODULES=f"{WEATHER},{BAD}untyped")
    proc = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"configuration error: TOOL_MODULES: module '{BAD}untyped', tool 'add': "
                                   "parameter 'b' has no type annotation (it gives the input schema)")


# --- ToolSet: tools of other kinds, and sources whose tools change ------------------------------------


class SchemaTool(Tool):
    """A tool defined by a JSON schema (as MCP and client tools are), returning what it is given."""

    def __init__(self, name: str, result: Any = "ok", timeout_s: float = 1.0) -> None:
        self.name, self.description, self.timeout_s, self.result = name, f"{name} tool", timeout_s, result

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "input_schema": {"type": "object"}}

    async def call(self, args: Any) -> Any:
        if self.result == "sleep":
            await asyncio.sleep(10)
        return self.result


class Source:
    """A ToolSource (the interface MCP servers implement): tools that change at runtime."""

    def __init__(self, *tools: Tool) -> None:
        self._tools, self.version, self.listed = list(tools), 0, 0

    def tools(self) -> list[Tool]:
        self.listed += 1
        return list(self._tools)

    def replace(self, *tools: Tool) -> None:
        self._tools = list(tools)
        self.version += 1


def test_sources_follow_their_version_and_are_derived_once(caplog: pytest.LogCaptureFixture) -> None:
    source = Source(SchemaTool("srv__a"), SchemaTool("calculator"))
    tools = load_toolset(None).with_sources(source)
    with caplog.at_level(logging.WARNING, logger="server.tools.registry"):
        assert tools.names() == ["calculator", "current_time", "srv__a"]  # (the clash: skipped)
        first = tools.definitions()
        assert tools.definitions() is first and tools.version == (0,) and source.listed == 1
        assert tools["calculator"] is not source._tools[1]
        source.replace(SchemaTool("srv__b"), SchemaTool("calculator"))
        assert "srv__a" not in tools and "srv__b" in tools and tools.version == (1,)
        assert [d["name"] for d in tools.definitions()] == ["calculator", "current_time", "srv__b"]
        assert source.listed == 2
    clashes = [r for r in caplog.records if "'calculator'" in r.getMessage()]
    assert len(clashes) == 1 and "skipped" in clashes[0].getMessage()


def test_a_toolset_without_sources_is_fixed() -> None:
    tools = ToolSet([SchemaTool("one")])
    assert tools.version == () and tools.definitions() is tools.definitions()
    assert len(tools) == 1 and list(tools) == ["one"] and tools.get("two") is None
    with pytest.raises(ValueError, match="duplicate tool name 'one'"):
        ToolSet([SchemaTool("one"), SchemaTool("one")])


@pytest.mark.asyncio
async def test_results_of_other_tools_become_tool_result_content() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    tools = ToolSet([SchemaTool("blocks", [{"type": "text", "text": "hi"}, image]),
                     SchemaTool("data", [{"id": 1}]),
                     SchemaTool("struct", {"a": [1, "é"]}),
                     SchemaTool("failed", ToolResult([{"type": "text", "text": "down"}], is_error=True)),
                     SchemaTool("broken", ToolResult([{"type": "text"}])),
                     SchemaTool("empty", ToolResult([])),
                     SchemaTool("odd", ToolResult(42)),  # type: ignore[arg-type]
                     SchemaTool("slow", "sleep", timeout_s=0.05)],
                    sources=[Source(SchemaTool("remote", "from a source"))])
    outcomes = {o.name: o for o in await tools.run_all([(n, n, {}) for n in tools])}
    assert outcomes["blocks"].output == [{"type": "text", "text": "hi"}, image]
    assert outcomes["data"].output == '[{"id": 1}]'  # (not content blocks: JSON)
    assert outcomes["struct"].output == '{"a": [1, "é"]}'
    assert outcomes["failed"].is_error and outcomes["failed"].outcome == "error"
    assert outcomes["failed"].tool_result_block() == {"type": "tool_result", "tool_use_id": "failed",
                                                      "content": [{"type": "text", "text": "down"}], "is_error": True}
    assert outcomes["broken"].output == "tool returned invalid content: block 0: a text block needs a string 'text'"
    assert outcomes["empty"].output == "tool returned invalid content: no content blocks"
    assert outcomes["odd"].output == "tool returned invalid content: int, not text or content blocks"
    assert outcomes["slow"].outcome == "timeout"
    assert outcomes["remote"].output == "from a source" and outcomes["remote"].input == {}
    not_object = await tools.run_one("x", "remote", ["a"])
    assert not_object.output == "invalid input for tool 'remote': input: Input should be an object"


# --- real servers: the fake model calls module tools ----------------------------------------------


async def test_module_tools_in_a_turn(start_server, upstream) -> None:
    server = start_server(TOOL_MODULES=f"{WEATHER},{KIT}", TOOL_TIMEOUT_SECONDS="4")
    calls = [("t1", "forecast", {"city": "Paris", "days": 2}), ("t2", "search", {"term": "tea", "limit": 1}),
             ("t3", "red_dot", {}), ("t4", "refuse", {"reason": "policy"}), ("t5", "explode", {"message": "boom"}),
             ("t6", "slow-echo", {"text": "hi", "delay": 3}), ("t7", "roll", {}),
             ("t8", "forecast", {"days": 9}), ("t9", "shadowing", {"json": "{}"})]
    upstream.script({"tool_use": [{"id": i, "name": n, "input": a} for i, n, a in calls]})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        events = await sse_turn(client, {"message": "Weather in Paris?"})
    first, second = upstream.requests()
    tools = first["body"]["tools"]
    assert [t["name"] for t in tools] == ["calculator", "current_time", *WEATHER_TOOLS, "roll"]
    assert tools[-1]["cache_control"] == {"type": "ephemeral"} and all("cache_control" not in t for t in tools[:-1])
    assert tools[2]["input_schema"]["required"] == ["city"]

    inputs = {e["tool_use_id"]: e for e in events if e["type"] == "tool_input"}
    assert inputs["t1"]["valid"] and not inputs["t8"]["valid"]
    assert inputs["t8"]["error"] == "invalid input for tool 'forecast': city: Field required; days: Input should " \
                                    "be less than or equal to 7"
    results = {e["tool_use_id"]: e for e in events if e["type"] == "tool_result"}
    assert results["t1"]["output"] == '{"city": "Paris", "days": 2, "unit": "C", "sky": "clear", "high": 21}'
    assert results["t2"]["output"] == '["tea #1"]'
    assert [b["type"] for b in results["t3"]["output"]] == ["text", "image"]
    assert results["t4"] == {**results["t4"], "is_error": True, "error": "refused: policy"}
    assert results["t5"]["error"] == "RuntimeError: boom"
    assert results["t6"]["error"] == "tool 'slow-echo' timed out after 0.5 s"
    assert results["t7"]["output"] == "6"
    assert results["t9"]["output"] == '{"json": "{}", "schema": 0, "model_config": false}'
    assert events[-1]["type"] == "turn_end"

    # What the model got back: one tool_result per call, in order, content as the tools gave it.
    sent = strip_cache(second["body"]["messages"][-1]["content"])
    assert [b["tool_use_id"] for b in sent] == [i for i, _, _ in calls]
    by_id = {b["tool_use_id"]: b for b in sent}
    assert by_id["t3"]["content"][1]["source"]["media_type"] == "image/png" and "is_error" not in by_id["t3"]
    assert by_id["t4"] == {"type": "tool_result", "tool_use_id": "t4", "content": "refused: policy", "is_error": True}
    assert by_id["t8"]["is_error"] is True


async def test_enabled_tools_narrow_the_module_tools(start_server, upstream) -> None:
    """(Two workers: each imports the modules, from the working directory the server started in.)"""
    server = start_server(workers=2, TOOL_MODULES=f"{WEATHER},{KIT}", ENABLED_TOOLS="roll,forecast")
    upstream.script({"tool_use": [{"id": "r", "name": "roll", "input": {"sides": 12}},
                                  {"id": "c", "name": "calculator", "input": {"expression": "1+1"}}]})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        events = await sse_turn(client, {"message": "Roll a d12"})
    assert [t["name"] for t in upstream.requests()[0]["body"]["tools"]] == ["roll", "forecast"]
    results = {e["tool_use_id"]: e for e in events if e["type"] == "tool_result"}
    assert results["r"]["output"] == "12"
    assert results["c"]["error"] == "unknown tool 'calculator'; available: roll, forecast"
    assert events[-1]["type"] == "turn_end" and events[-1]["text"] == "The result is 12."
