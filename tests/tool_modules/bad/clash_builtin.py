"""Defines `calculator`, a built-in tool's name."""

from server.tools import tool


@tool
def calculator(expression: str) -> str:
    """My own calculator."""
    return expression
