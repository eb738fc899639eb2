"""Two functions, one tool name."""

from server.tools import tool


@tool
def lookup(term: str) -> str:
    """Look a term up."""
    return term


@tool(name="lookup")
def lookup_again(term: str) -> str:
    """Look a term up, again."""
    return term
