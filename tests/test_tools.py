"""Tests for server.tools: schemas, calculator safety, current_time, ToolSet execution."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from server.tools import FunctionTool, available_tools, load_toolset
from server.tools.calculator import evaluate, format_number
from server.tools.registry import ToolOutcome, ToolSet


@pytest.fixture
def tools() -> ToolSet:
    return load_toolset(["calculator", "current_time"])


async def calc(tools: ToolSet, expression: str) -> ToolOutcome:
    return await tools.run_one("tu_1", "calculator", {"expression": expression})


def _walk_keys(obj: object) -> list[str]:
    """All dict keys in a schema except property names."""
    keys: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            keys.append(key)
            if key == "properties":
                for sub in value.values():
                    keys.extend(_walk_keys(sub))
            else:
                keys.extend(_walk_keys(value))
    elif isinstance(obj, list):
        for item in obj:
            keys.extend(_walk_keys(item))
    return keys


# --- definitions -----------------------------------------------------------


def test_definitions_shape(tools: ToolSet) -> None:
    defs = {d["name"]: d for d in tools.definitions()}
    assert tools.names() == ["calculator", "current_time"]
    assert len(tools) == 2 and tools
    for d in defs.values():
        assert set(d) == {"name", "description", "input_schema"}
        assert d["description"]
        schema = d["input_schema"]
        assert schema["type"] == "object"
        assert isinstance(schema["properties"], dict)
        assert "title" not in _walk_keys(schema)

    calc_schema = defs["calculator"]["input_schema"]
    assert calc_schema["required"] == ["expression"]
    assert calc_schema["properties"]["expression"]["type"] == "string"
    assert calc_schema["properties"]["expression"]["maxLength"] == 200
    assert "description" in calc_schema["properties"]["expression"]

    time_schema = defs["current_time"]["input_schema"]
    assert "timezone" not in time_schema.get("required", [])
    assert time_schema["properties"]["timezone"]["default"] == "UTC"


def test_definition_keeps_property_named_title() -> None:
    class In(BaseModel):
        title: str
        kind: str = "a"

    schema = FunctionTool("t", "d", In, lambda m: None).definition()["input_schema"]
    assert set(schema["properties"]) == {"title", "kind"}
    assert "title" not in schema["properties"]["title"]
    assert schema["required"] == ["title"]


def test_empty_toolset_is_falsy() -> None:
    empty = ToolSet([])
    assert not empty and len(empty) == 0 and empty.definitions() == []


# --- calculator ------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+3*4", "14"),
        ("(2+3)*4", "20"),
        ("-3 + 5", "2"),
        ("-(2+3)", "-5"),
        ("--4", "4"),
        ("+7", "7"),
        ("-2^2", "-4"),
        ("2^10", "1024"),
        ("2**3**2", "512"),
        ("1/3", "0.333333333333"),
        ("7/2", "3.5"),
        ("6/2", "3"),
        ("0.1+0.2", "0.3"),
        ("2.5*4", "10"),
        ("7 % 3", "1"),
        ("-7 // 2", "-4"),
        ("7//2", "3"),
        ("2**-1", "0.5"),
        (" 1 + 1 ", "2"),
        ("10**100", str(10**100)),
    ],
)
async def test_calculator_results(tools: ToolSet, expression: str, expected: str) -> None:
    outcome = await calc(tools, expression)
    assert not outcome.is_error, outcome.output
    assert outcome.output == expected
    assert outcome.input == {"expression": expression}
    assert outcome.tool_result_block() == {
        "type": "tool_result",
        "tool_use_id": "tu_1",
        "content": expected,
    }


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("__import__('os')", "function calls"),
        ("x + 1", "names"),
        ("abs(-1)", "function calls"),
        ("(1).real", "attribute access"),
        ("[1, 2][0]", "subscripts"),
        ("1 < 2", "comparisons"),
        ("'a' * 3", "unsupported expression"),
        ("True + 1", "unsupported expression"),
        ("1j * 2", "unsupported expression"),
        ("lambda: 1", "unsupported expression"),
        ("9**9**9", "exponent too large"),
        ("10**101", "exponent too large"),
        ("(10**60)**2", "too large"),
        ("1e300 * 1e300", "too large"),
        ("(-8) ** 0.5", "not a real number"),
        ("1/0", "division by zero"),
        ("5 // 0", "division by zero"),
        ("5 % 0.0", "division by zero"),
        ("2 +", "invalid syntax"),
        ("1; 2", "invalid syntax"),
    ],
)
async def test_calculator_rejects(tools: ToolSet, expression: str, fragment: str) -> None:
    outcome = await calc(tools, expression)
    assert outcome.is_error
    assert fragment in outcome.output
    assert "Traceback" not in outcome.output
    assert outcome.tool_result_block()["is_error"] is True


@pytest.mark.asyncio
async def test_calculator_rejects_long_input(tools: ToolSet) -> None:
    outcome = await calc(tools, "1+" * 150 + "1")
    assert outcome.is_error
    assert outcome.input is None
    assert outcome.output.startswith("invalid input for tool 'calculator'")
    assert "expression:" in outcome.output and "200" in outcome.output


@pytest.mark.asyncio
async def test_calculator_missing_and_extra_fields(tools: ToolSet) -> None:
    missing = await tools.run_one("a", "calculator", {})
    assert missing.is_error and "expression: Field required" in missing.output
    extra = await tools.run_one("b", "calculator", {"expression": "1", "precision": 3})
    assert extra.is_error and "precision" in extra.output
    not_a_dict = await tools.run_one("c", "calculator", "1+1")
    assert not_a_dict.is_error and "input:" in not_a_dict.output


def test_calculator_deep_unary_within_limits() -> None:
    assert evaluate("-" * 199 + "1") == -1


# Expression trees of small ints combined with + - *, rendered fully parenthesised.
_leaf = st.integers(min_value=-50, max_value=50).map(lambda n: ("num", n))
_tree = st.recursive(
    _leaf,
    lambda children: st.tuples(st.sampled_from("+-*"), children, children),
    max_leaves=10,
)


def _render(node: tuple) -> str:
    if node[0] == "num":
        return f"({node[1]})" if node[1] < 0 else str(node[1])
    op, left, right = node
    return f"({_render(left)} {op} {_render(right)})"


def _expected(node: tuple) -> int:
    if node[0] == "num":
        return node[1]
    op, left, right = node
    a, b = _expected(left), _expected(right)
    return a + b if op == "+" else a - b if op == "-" else a * b


@settings(max_examples=200, deadline=None)
@given(_tree)
def test_calculator_matches_integer_arithmetic(tree: tuple) -> None:
    expression = _render(tree)
    assert len(expression) <= 200
    result = evaluate(expression)
    assert isinstance(result, int)
    assert format_number(result) == str(_expected(tree))


# --- current_time ----------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "Asia/Kolkata", "America/New_York"])
async def test_current_time_valid_zone(tools: ToolSet, zone: str) -> None:
    outcome = await tools.run_one("t", "current_time", {"timezone": zone})
    assert not outcome.is_error, outcome.output
    data = json.loads(outcome.output)
    assert set(data) == {"timezone", "iso", "utc_offset", "weekday"}
    assert data["timezone"] == zone
    parsed = datetime.fromisoformat(data["iso"])
    assert parsed.microsecond == 0
    expected_offset = ZoneInfo(zone).utcoffset(parsed.replace(tzinfo=None))
    assert parsed.utcoffset() == expected_offset
    assert data["iso"].endswith(data["utc_offset"])
    assert data["weekday"] == parsed.strftime("%A")
    now = datetime.now(ZoneInfo(zone))
    assert abs((now - parsed).total_seconds()) < 5


@pytest.mark.asyncio
async def test_current_time_defaults_to_utc(tools: ToolSet) -> None:
    outcome = await tools.run_one("t", "current_time", {})
    assert not outcome.is_error
    data = json.loads(outcome.output)
    assert data["timezone"] == "UTC" and data["utc_offset"] == "+00:00"
    assert outcome.input == {"timezone": "UTC"}


@pytest.mark.asyncio
@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", ""])
async def test_current_time_invalid_zone(tools: ToolSet, zone: str) -> None:
    outcome = await tools.run_one("t", "current_time", {"timezone": zone})
    assert outcome.is_error and outcome.outcome == "invalid" and outcome.seconds == 0
    assert outcome.input is None
    assert f"unknown timezone {zone!r}" in outcome.output
    assert "Value error," not in outcome.output


# --- ToolSet execution -----------------------------------------------------


class _Empty(BaseModel):
    pass


class _Delay(BaseModel):
    seconds: float
    label: str


def _boom(_: _Empty) -> str:
    raise RuntimeError("disk on fire")


async def _sleep(args: _Delay) -> dict:
    await asyncio.sleep(args.seconds)
    return {"label": args.label, "note": "ünïcode"}


def _sync_value(_: _Empty) -> list[int]:
    return [1, 2, 3]


@pytest.mark.asyncio
async def test_unknown_tool(tools: ToolSet) -> None:
    outcome = await tools.run_one("u", "shell", {"cmd": "ls"})
    assert outcome.is_error and outcome.input is None
    assert outcome.output == "unknown tool 'shell'; available: calculator, current_time"


def test_validate_returns_model_or_error(tools: ToolSet) -> None:
    model, error = tools.validate("calculator", {"expression": "1+1"})
    assert error is None and model is not None and model.expression == "1+1"  # type: ignore[attr-defined]
    model, error = tools.validate("nope", {})
    assert model is None and error is not None and "unknown tool 'nope'" in error


@pytest.mark.asyncio
async def test_sync_tool_exception_is_reported() -> None:
    toolset = ToolSet([FunctionTool("boom", "raises", _Empty, _boom)])
    outcome = await toolset.run_one("x", "boom", {})
    assert outcome.is_error
    assert outcome.output == "RuntimeError: disk on fire"
    assert outcome.input == {} and outcome.outcome == "error"


@pytest.mark.asyncio
async def test_non_string_results_are_json() -> None:
    toolset = ToolSet(
        [
            FunctionTool("sleep", "sleeps", _Delay, _sleep),
            FunctionTool("list", "returns a list", _Empty, _sync_value),
        ]
    )
    slept = await toolset.run_one("a", "sleep", {"seconds": 0, "label": "x"})
    assert slept.output == '{"label": "x", "note": "ünïcode"}'
    listed = await toolset.run_one("b", "list", {})
    assert listed.output == "[1, 2, 3]" and not listed.is_error and listed.outcome == "ok"


@pytest.mark.asyncio
async def test_async_tool_timeout() -> None:
    toolset = ToolSet([FunctionTool("slow", "too slow", _Delay, _sleep, timeout_s=0.05)])
    outcome = await toolset.run_one("s", "slow", {"seconds": 5, "label": "x"})
    assert outcome.is_error
    assert "timed out" in outcome.output and "0.05" in outcome.output
    assert outcome.input == {"seconds": 5.0, "label": "x"}
    assert outcome.outcome == "timeout" and 0.04 < outcome.seconds < 1  # (its own run time, for spans)


@pytest.mark.asyncio
async def test_run_all_keeps_order_and_runs_in_parallel(tools: ToolSet) -> None:
    toolset = ToolSet([FunctionTool("sleep", "sleeps", _Delay, _sleep), *available_tools().values()])
    calls: list[tuple[str, str, object]] = [
        ("1", "sleep", {"seconds": 0.2, "label": "first"}),
        ("2", "calculator", {"expression": "1/0"}),
        ("3", "sleep", {"seconds": 0.2, "label": "second"}),
        ("4", "calculator", {"expression": "6*7"}),
    ]
    start = time.perf_counter()
    outcomes = await toolset.run_all(calls)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.35
    assert [o.tool_use_id for o in outcomes] == ["1", "2", "3", "4"]
    assert json.loads(outcomes[0].output)["label"] == "first" and outcomes[0].seconds >= 0.2
    assert outcomes[1].is_error and "division by zero" in outcomes[1].output
    assert json.loads(outcomes[2].output)["label"] == "second"
    assert outcomes[3].output == "42"


@pytest.mark.asyncio
async def test_run_all_empty(tools: ToolSet) -> None:
    assert await tools.run_all([]) == []


# --- load_toolset ----------------------------------------------------------


def test_load_toolset_unknown_name() -> None:
    with pytest.raises(ValueError) as excinfo:
        load_toolset(["calculator", "web_search"])
    message = str(excinfo.value)
    assert "'web_search'" in message
    assert "calculator" in message and "current_time" in message


def test_load_toolset_subset_and_dedupe() -> None:
    toolset = load_toolset(["current_time", "current_time"])
    assert toolset.names() == ["current_time"]
    assert "calculator" not in toolset
    assert not load_toolset([])


def test_duplicate_tool_names_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        ToolSet([available_tools()["calculator"], available_tools()["calculator"]])
