"""Structured logs: one JSON object per line, easy to ship and to grep.

Loggers under `server.` pass structured fields as `extra={"fields": {...}}`; they are merged
into the line. Never log request bodies, keys or per-token events.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

from . import request_id


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.current()
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


# -- refused WebSocket handshakes --------------------------------------------------------
# Refusing a handshake with an HTTP status (server/security.py `_deny_websocket`) makes
# uvicorn log "ASGI callable returned without completing handshake." at ERROR: anyone could
# fill the error log with it. The refusal is marked in the connection's task context, and
# that one line is dropped for it (uvicorn's INFO line `"WebSocket /path" 401` remains).
_handshake_refused: ContextVar[bool] = ContextVar("handshake_refused", default=False)
_UNFINISHED_HANDSHAKE = frozenset({
    "ASGI callable returned without completing handshake.",  # websockets-sansio, wsproto
    "ASGI callable returned without sending handshake.",     # websockets (legacy)
})


def handshake_refused() -> None:
    """Called by the app when it answers a WebSocket handshake with an HTTP refusal."""
    _handshake_refused.set(True)


class QuietRefusedHandshakes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg in _UNFINISHED_HANDSHAKE and _handshake_refused.get())
