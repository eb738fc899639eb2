"""Which web pages may call: CORS headers for ALLOWED_ORIGINS, a 403 for the others.

Without keys the network position is the only credential, so a browser request from an
Origin outside ALLOWED_ORIGINS is refused (403): no web page can spend the budget. With
keys the check still guards WebSocket handshakes, which browsers send cross-origin freely.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Message, Receive, Scope, Send

from ..config import Settings
from ..errors import ApiError, error_response

_DEFAULT_PORTS = {"http": 80, "https": 443}
_WS_SCHEMES = {"ws": "http", "wss": "https"}


def cors_options(settings: Settings) -> dict[str, Any]:
    """CORS options (AllowlistCORS). No credentials ever: keys travel in headers, not
    cookies, so `*` in ALLOWED_ORIGINS cannot leak an ambient credential."""
    return dict(allow_origins=list(settings.allowed_origins), allow_credentials=False,
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                expose_headers=["X-Session-ID", "X-Turn-ID", "Retry-After", "X-Request-ID"], max_age=600)


class AllowlistCORS(CORSMiddleware):
    """Starlette's CORSMiddleware, except that a foreign Origin gets no CORS header at all
    (Starlette still adds Expose-Headers) and a foreign preflight a JSON 403."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not self.is_allowed_origin(origin):
                if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                    await error_response(ApiError("forbidden_origin"))(scope, receive, send)
                    return

                async def send_vary(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        MutableHeaders(scope=message).add_vary_header("Origin")
                    await send(message)

                await self.app(scope, receive, send_vary)
                return
        await super().__call__(scope, receive, send)


def check_origin(allowed: frozenset[str], headers: Headers, scope: Scope) -> None:
    """A browser's Origin must be in ALLOWED_ORIGINS (scheme, host and port), or be this
    server's own origin: the scheme the request came in by (X-Forwarded-Proto from a
    trusted proxy, as uvicorn's --proxy-headers put it in the scope; ws/wss count as
    http/https) and the Host header's host and port (the built-in chat page)."""
    origin = headers.get("origin")
    if origin is None or "*" in allowed:
        return
    key = _origin_key(origin)
    if key is not None and (key in _origin_keys(allowed) or key == _request_origin(scope, headers.get("host"))):
        return
    raise ApiError("forbidden_origin", "This origin is not allowed (ALLOWED_ORIGINS).")


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, the port made explicit; None if it is not an
    http(s) origin (`null`, a path, credentials, garbage)."""
    try:
        parts = urlsplit(origin.strip().rstrip("/"))
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc or parts.path \
            or parts.query or parts.fragment:
        return None
    return scheme, parts.hostname, port or _DEFAULT_PORTS[scheme]


@lru_cache(maxsize=8)
def _origin_keys(origins: frozenset[str]) -> frozenset[tuple[str, str, int]]:
    return frozenset(k for k in map(_origin_key, origins) if k is not None)


def _request_origin(scope: Scope, host: str | None) -> tuple[str, str, int] | None:
    """The origin this request was addressed to: its scheme and its Host header."""
    if not host or "/" in host:
        return None
    scheme = str(scope.get("scheme") or "http").lower()
    return _origin_key(f"{_WS_SCHEMES.get(scheme, scheme)}://{host}")
