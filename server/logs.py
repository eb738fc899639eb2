"""Structured logs: one JSON object per line, easy to ship and to grep.

Loggers under `server.` pass structured fields as `extra={"fields": {...}}`; they are merged
into the line. Never log request bodies, keys or per-token events.

Every line also carries the request id (server/middleware.py): it lives in a context
variable, and tasks started while handling a request (a turn, a WebSocket's forwarding task)
copy the context, so their lines carry the id of the request that started them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# Letters, digits and a few separators: nothing that could split a log line or a header.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def accept_request_id(value: str | None) -> str:
    """The client's `X-Request-ID` if it is 1-128 safe characters, else a new random one."""
    return value if value and _SAFE_ID.fullmatch(value) else uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            line["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str) -> None:
    """JSON lines on stderr for our loggers; uvicorn keeps its own access/error format.

    No line carries a source location, thread or process name, so the logging module is
    told not to gather them (its documented optimisation: finding the caller walks the
    whole, deep, async stack of every line)."""
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logger = logging.getLogger("server")
    if any(getattr(h, "_agent_json", False) for h in logger.handlers):
        logger.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._agent_json = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
