"""Defines `lookup`, as clash_b does."""

from server.tools import tool


@tool
def lookup(term: str) -> str:
    """Look a term up (a)."""
    return "a:" + term
