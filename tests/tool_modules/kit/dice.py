"""A tool in a package's submodule."""

from server.tools import tool


@tool(timeout=2)
def roll(sides: int = 6) -> int:
    """Roll a (fixed) die: always the highest face."""
    return sides
