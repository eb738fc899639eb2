"""A parameter type pydantic cannot validate from JSON."""

import threading

from server.tools import tool


@tool
def wait(lock: threading.Lock) -> str:
    """Wait on a lock."""
    return "done"
