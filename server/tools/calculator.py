"""Safe arithmetic calculator: expressions are parsed with `ast` and evaluated by walking an
allowlist of node types; nothing is ever compiled or executed, so names, calls and attribute
access are impossible. Size limits keep every evaluation cheap."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from .functions import tool

MAX_LENGTH = 200
MAX_NODES = 200  # counts value nodes (numbers and operations)
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10**100

Number = int | float

_BINARY_OPS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FORBIDDEN_KINDS: dict[type[ast.AST], str] = {
    ast.Name: "names", ast.Call: "function calls", ast.Attribute: "attribute access", ast.Subscript: "subscripts",
    ast.Compare: "comparisons", ast.BoolOp: "boolean operators",
}


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate."""


class CalculatorInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expression: str = Field(min_length=1, max_length=MAX_LENGTH, description=(
        "Arithmetic expression using numbers, parentheses and the operators "
        "+ - * / // (floor division) % (modulo) ** or ^ (power), e.g. '(2 + 3) * 4 ^ 2'."))


def _unsupported(node: ast.AST) -> CalculatorError:
    kind = _FORBIDDEN_KINDS.get(type(node), type(node).__name__)
    snippet = text if len(text := ast.unparse(node)) <= 60 else text[:57] + "..."
    return CalculatorError(f"unsupported expression: {kind} not allowed ({snippet!r}); "
                           "only numbers, parentheses and + - * / // % ** ^ are supported")


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):  # excludes bool, complex, str
            if abs(node.value) > MAX_MAGNITUDE:
                raise CalculatorError("number too large (limit 1e100)")
            return node.value
        raise _unsupported(node)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent too large (limit {MAX_EXPONENT})")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ZeroDivisionError("division by zero")
        try:
            value = _BINARY_OPS[type(node.op)](left, right)
        except OverflowError:
            raise CalculatorError("result is too large") from None
        if isinstance(value, complex):
            raise CalculatorError("result is not a real number")
        if isinstance(value, float) and not math.isfinite(value):
            raise CalculatorError("result is too large")
        if abs(value) > MAX_MAGNITUDE:
            raise CalculatorError("result is too large (limit 1e100)")
        return value
    raise _unsupported(node)


def evaluate(expression: str) -> Number:
    """Evaluate an arithmetic expression; raises CalculatorError or ZeroDivisionError."""
    source = expression.replace("^", "**").strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"invalid syntax: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise CalculatorError("invalid expression") from None
    if sum(isinstance(n, ast.expr) for n in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression too complex (limit {MAX_NODES} nodes)")
    return _eval(tree.body)


def format_number(value: Number) -> str:
    """Ints verbatim; floats to 12 significant digits (0.1+0.2 -> '0.3')."""
    return str(value) if isinstance(value, int) else format(value, ".12g")


@tool(timeout=5.0)
def calculator(args: CalculatorInput) -> str:
    """Evaluate an arithmetic expression exactly and return the numeric result.
    Use it for any non-trivial arithmetic instead of computing in your head."""
    return format_number(evaluate(args.expression))
