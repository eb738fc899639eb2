"""What the logs must never say: credentials, message contents, refusals as errors.

At DEBUG uvicorn logs handshake headers (`Authorization`, `Sec-WebSocket-Protocol:
bearer.<key>`) and every WebSocket frame; access logs carry the query string. The secret
part of such lines is blanked (bearer tokens, `?ticket=`, `?key=`, `?token=`... values) and
frames are logged without their payload, at any level.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote_plus

_SECRET_RE = re.compile(r"(?i)(bearer[ .]|ticket=)[^\s,;&\"']+")
# Query parameters whose value is a credential (names compared lower-cased, percent-decoded).
SECRET_PARAMS = frozenset({"key", "api_key", "apikey", "api-key", "x-api-key", "token", "access_token",
                           "refresh_token", "id_token", "auth", "authorization", "ticket", "password", "secret"})
_PARAM_RE = re.compile(r"([?&;])([^=&;#?\s\"']+)=([^&;#\s\"']*)")
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
_FRAME_LINES = frozenset({"< %s", "> %s"})  # websockets' frame lines (at DEBUG, on uvicorn.error)


def _redact_param(m: re.Match[str]) -> str:
    return f"{m[1]}{m[2]}=<redacted>" if unquote_plus(m[2]).lower() in SECRET_PARAMS else m[0]


def redact(text: str) -> str:
    """`text` with bearer tokens and the values of secret query parameters blanked."""
    if "=" in text:
        text = _PARAM_RE.sub(_redact_param, text)
    return _SECRET_RE.sub(r"\1<redacted>", text)


def _frame_summary(frame: Any) -> str:
    """A WebSocket frame without its payload: `TEXT [51 bytes]` (a close keeps its code)."""
    kind = getattr(frame.opcode, "name", str(frame.opcode))
    return str(frame) if kind == "CLOSE" else f"{kind} [{len(frame.data)} bytes]"


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(record.msg, str):
            if record.msg in _FRAME_LINES and isinstance(args, tuple) and len(args) == 1 \
                    and hasattr(args[0], "opcode") and hasattr(args[0], "data"):
                record.args = (_frame_summary(args[0]),)
                return True
            record.msg = redact(record.msg)
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() in _SECRET_HEADERS:
            record.args = (args[0], "<redacted>")  # websockets' "< %s: %s" header lines
        elif isinstance(args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        return True


# Refusing a handshake with an HTTP status (the guard's `_deny_websocket`) makes uvicorn
# log "ASGI callable returned without completing handshake." at ERROR: anyone could fill
# the error log with it. The refusal is marked in the connection's task context, and that
# one line is dropped for it (uvicorn's INFO line `"WebSocket /path" 401` remains).
_handshake_refused: ContextVar[bool] = ContextVar("handshake_refused", default=False)
_UNFINISHED_HANDSHAKE = frozenset({
    "ASGI callable returned without completing handshake.",  # websockets-sansio, wsproto
    "ASGI callable returned without sending handshake.",     # websockets (legacy)
})


def handshake_refused() -> None:
    """Called when a WebSocket handshake is answered with an HTTP refusal."""
    _handshake_refused.set(True)


class QuietRefusedHandshakes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg in _UNFINISHED_HANDSHAKE and _handshake_refused.get())


def install_log_redaction() -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets",
                 "websockets.server", "websockets.protocol"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
    errors = logging.getLogger("uvicorn.error")  # (a refused handshake is not a server error)
    if not any(isinstance(f, QuietRefusedHandshakes) for f in errors.filters):
        errors.addFilter(QuietRefusedHandshakes())
