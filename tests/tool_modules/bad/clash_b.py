"""Defines `lookup`, as clash_a does."""

from server.tools import tool


@tool
def lookup(term: str) -> str:
    """Look a term up (b)."""
    return "b:" + term
