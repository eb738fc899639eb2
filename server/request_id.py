"""The request id: accepted from `X-Request-ID` when it is safe, otherwise generated.

It lives in a context variable for the request's duration. Tasks started while handling the
request (a turn, a WebSocket's forwarding task) copy the context, so the turn's log line
carries the id of the request that started it; `logs.JsonFormatter` adds it to every line.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

HEADER = "x-request-id"
MAX_LENGTH = 128
# Letters, digits and a few separators: nothing that could split a log line or a header.
_SAFE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,%d}" % MAX_LENGTH)

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def current() -> str | None:
    return request_id.get()


def accept(value: str | None) -> str:
    """The client's id if it is 1-128 safe characters, else a new random one."""
    if value and _SAFE.fullmatch(value):
        return value
    return uuid.uuid4().hex
