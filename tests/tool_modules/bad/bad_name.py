"""A name the API refuses."""

from server.tools import tool


@tool(name="look up")
def look_up(term: str) -> str:
    """Look a term up."""
    return term
