"""Structured logs: one JSON object per line, easy to ship and to grep; and what no log says.

Loggers under `server.` pass structured fields as `extra={"fields": {...}}`, merged into the
line. Never log request bodies, keys or per-token events. Every line carries the request id
(server/middleware.py): a context variable, inherited by the tasks a request starts (a turn,
a WebSocket's forwarding task), so their lines carry it too; with tracing on, also the current
trace id (server/tracing.py).

The access log is ours (`server.access`, server/middleware.py: one JSON line per request or
WebSocket connection, no query string); uvicorn's is off. uvicorn's and websockets' other lines
keep their format, redacted (README "Security"): at DEBUG they carry handshake headers and every
WebSocket frame. uvicorn's WebSocket handshake lines are its access log under another logger:
the accepted one is dropped (the access line says it), a refusal's INFO line stays, without its
query string. A handshake refused with an HTTP status (the guard's `_deny_websocket`) is not a
server error (anyone can cause one): uvicorn's ERROR line about it is dropped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from urllib.parse import unquote_plus, urlsplit

from . import tracing

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# Set in the connection's task context when a WebSocket handshake is answered with an HTTP refusal.
handshake_refused: ContextVar[bool] = ContextVar("handshake_refused", default=False)

_SECRET_RE = re.compile(r"(?i)(bearer[ .]|ticket=)[^\s,;&\"']+")
# Query parameters whose value is a credential (names compared lower-cased, percent-decoded).
SECRET_PARAMS = frozenset({"key", "api_key", "apikey", "api-key", "x-api-key", "token", "access_token",
                           "refresh_token", "id_token", "auth", "authorization", "ticket", "password", "secret"})
_PARAM_RE = re.compile(r"([?&;])([^=&;#?\s\"']+)=([^&;#\s\"']*)")
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
_FRAME_LINES = frozenset({"< %s", "> %s"})  # websockets' frame lines (at DEBUG, on uvicorn.error)
_WS_HANDSHAKE = '%s - "WebSocket %s" '  # (uvicorn's handshake lines: [accepted], 403 or %d)
_UNFINISHED_HANDSHAKE = frozenset({"ASGI callable returned without completing handshake.",  # websockets-sansio, wsproto
                                   "ASGI callable returned without sending handshake."})  # websockets (legacy)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if (rid := request_id.get()) is not None:
            line["request_id"] = rid
        if tracing.enabled and (trace_id := tracing.current_trace_id()) is not None:
            line["trace_id"] = trace_id
        if isinstance(fields := getattr(record, "fields", None), dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str) -> None:
    """JSON lines on stderr for our loggers; uvicorn's and websockets' lines redacted.

    No line carries a source location, thread or process name, so the logging module is
    told not to gather them (finding the caller walks the whole, deep, async stack)."""
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets",
                 "websockets.server", "websockets.protocol"):
        logging.getLogger(name).addFilter(redact_record)  # (a filter added twice is there once)
    logger = logging.getLogger("server")
    logger.setLevel(level)
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.propagate = False


def redact(text: str) -> str:
    """`text` with bearer tokens and the values of secret query parameters blanked."""
    if "=" in text:
        text = _PARAM_RE.sub(lambda m: f"{m[1]}{m[2]}=<redacted>" if unquote_plus(m[2]).lower() in SECRET_PARAMS
                             else m[0], text)
    return _SECRET_RE.sub(r"\1<redacted>", text)


def url_without_secrets(url: str) -> str:
    """A service URL for a log line: scheme, host, port and path only (a query string or a
    `user:password@` could hold a secret)."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
    except ValueError:
        return "(an unparsable URL)"


def redact_record(record: logging.LogRecord) -> bool:
    args = record.args
    if isinstance(record.msg, str):
        if record.msg in _UNFINISHED_HANDSHAKE and handshake_refused.get():
            return False  # (a refused handshake is not a server error)
        if record.msg.startswith(_WS_HANDSHAKE) and isinstance(args, tuple) and len(args) >= 2:
            if record.msg.endswith("[accepted]"):
                return False  # (the JSON access line has it, with its status 101)
            record.args = (args[0], str(args[1]).split("?", 1)[0], *args[2:])  # a refusal, without its query
            return True
        if record.msg in _FRAME_LINES and isinstance(args, tuple) and len(args) == 1 \
                and hasattr(args[0], "opcode") and hasattr(args[0], "data"):
            # The frame without its payload: `TEXT [51 bytes]` (a close keeps its code).
            kind = getattr(args[0].opcode, "name", str(args[0].opcode))
            record.args = (str(args[0]) if kind == "CLOSE" else f"{kind} [{len(args[0].data)} bytes]",)
            return True
        record.msg = redact(record.msg)
    if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() in _SECRET_HEADERS:
        record.args = (args[0], "<redacted>")  # websockets' "< %s: %s" header lines
    elif isinstance(args, tuple):
        record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
    return True
