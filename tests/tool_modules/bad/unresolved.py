"""A string annotation naming nothing the module defines."""

from __future__ import annotations

from server.tools import tool


@tool
def fetch(url: Url) -> str:  # noqa: F821
    """Fetch a page."""
    return url
