"""A timeout that is not a positive number of seconds."""

from server.tools import tool


@tool(timeout=0)
def instant(x: int) -> int:
    """Return x."""
    return x
