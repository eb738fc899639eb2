"""A parameter without a type annotation."""

from server.tools import tool


@tool
def add(a: int, b) -> int:  # type: ignore[no-untyped-def]
    """Add two numbers."""
    return a + b
