"""*args cannot come from a JSON object."""

from server.tools import tool


@tool
def total(*numbers: int) -> int:
    """Sum numbers."""
    return sum(numbers)
