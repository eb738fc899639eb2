"""The gate in front of every route: auth, origins, rate limits, stream slots, body size.

Modes (chosen once at startup from the config, logged by every worker):
- `keys`: AGENT_API_KEYS is set; everything but /health and /ready needs a key.
- `local`: no keys, loopback HOST (enforced by config validation): requests are served as
  "anonymous", but only from loopback clients with a loopback Host header (no DNS rebinding).
- `disabled`: AUTH_DISABLED=true: anyone who reaches the server is "anonymous".
Without keys the network position is the only credential, so a browser request from an
Origin outside ALLOWED_ORIGINS is refused (403): no web page can spend the budget.

Order per request: origin (WebSocket always, HTTP when keyless) -> auth -> tokens/minute
(turn starts) -> requests/minute -> body size -> a stream slot (SSE, WebSocket). Limits are
counted per principal; per client IP when there is no key ("ip:<addr>"), except tokens,
which the engine reports per session owner (one shared "anonymous" budget without keys).
If the limiter's Redis fails, requests are let through and a warning is logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import secrets
import time
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any, AsyncIterator
from urllib.parse import unquote_plus, urlsplit

from redis.exceptions import RedisError
from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import (ANONYMOUS, BEARER_SUBPROTOCOL_PREFIX, SCOPE_KEY, WS_SUBPROTOCOL, KeyRing, TicketSigner,
                   bearer_token, principal_of, subprotocol_key, ticket_secret)
from . import metrics
from .config import Settings
from .errors import ApiError, error_response
from .logs import QuietRefusedHandshakes, handshake_refused
from .ratelimit import SLOT_TTL_MS, Limiter, MemoryLimiter, RedisLimiter, bucket_key

log = logging.getLogger("server.security")

# Probes, the chat page and its assets, and the API description need no key.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/", "/openapi.json"})
PUBLIC_PREFIXES = ("/static/",)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
_SECRET_RE = re.compile(r"(?i)(bearer[ .]|ticket=)[^\s,;&\"']+")
# Query parameters whose value is a credential (names compared lower-cased, percent-decoded).
SECRET_PARAMS = frozenset({"key", "api_key", "apikey", "api-key", "x-api-key", "token", "access_token",
                           "refresh_token", "id_token", "auth", "authorization", "ticket", "password", "secret"})
_PARAM_RE = re.compile(r"([?&;])([^=&;#?\s\"']+)=([^&;#\s\"']*)")
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
    """At DEBUG uvicorn logs handshake headers (`Authorization`, `Sec-WebSocket-Protocol:
    bearer.<key>`) and every WebSocket frame; access logs carry the query string. Blank the
    secret part of such lines (bearer tokens, `?ticket=`, `?key=`, `?token=`... values), and
    log frames without their payload: message contents are never logged, at any level."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(record.msg, str):
            if record.msg in _FRAME_LINES and isinstance(args, tuple) and len(args) == 1 \
                    and hasattr(args[0], "opcode") and hasattr(args[0], "data"):
                record.args = (_frame_summary(args[0]),)
                return True
            record.msg = redact(record.msg)
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() in (
                "authorization", "proxy-authorization", "cookie", "x-api-key"):
            record.args = (args[0], "<redacted>")  # websockets' "< %s: %s" header lines
        elif isinstance(args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        return True


def install_log_redaction() -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets",
                 "websockets.server", "websockets.protocol"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
    errors = logging.getLogger("uvicorn.error")  # (a refused handshake is not a server error)
    if not any(isinstance(f, QuietRefusedHandshakes) for f in errors.filters):
        errors.addFilter(QuietRefusedHandshakes())


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


class Guard:
    """One per worker: the key ring, the ticket signer and the limiter."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = KeyRing(settings.api_keys)
        self.mode = "keys" if len(self.keys) else ("disabled" if settings.auth_disabled else "local")
        self.tickets = TicketSigner(ticket_secret(settings.ticket_secret, self.keys, settings.anthropic_api_key),
                                    settings.ws_ticket_ttl_seconds)
        self.origins = frozenset(settings.allowed_origins)
        self.limiter: Limiter = MemoryLimiter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_at = 0.0
        install_log_redaction()

    # -- lifecycle -------------------------------------------------------------------------
    @asynccontextmanager
    async def attached(self, engine: Any) -> AsyncIterator["Guard"]:
        """Share counters through Redis when configured; charge finished turns' tokens."""
        if self.settings.redis_url:
            # The store's client: one connection pool per worker, sized for every request
            # it serves (a burst waits for a connection instead of failing open).
            self.limiter = RedisLimiter(engine.store.redis)
        engine.turn_listeners.append(self.charge_tokens)
        self._log_mode()
        try:
            yield self
        finally:
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2)
            await self.limiter.close()

    def _log_mode(self) -> None:
        s = self.settings
        limits = (f"rpm={s.rate_limit_rpm or 'off'} tpm={s.rate_limit_tpm or 'off'} "
                  f"streams/principal={s.max_concurrent_streams_per_principal or 'off'} "
                  f"upstream/worker={s.max_concurrent_upstream} origins={','.join(s.allowed_origins) or 'none'}")
        if self.mode == "keys":
            log.info("auth: API keys required (%d configured); %s", len(self.keys), limits)
        elif self.mode == "local":
            log.warning("auth: OFF for local development (no AGENT_API_KEYS): loopback clients only, "
                        "as 'anonymous'; %s", limits)
        else:
            log.warning("auth: DISABLED (AUTH_DISABLED=true): anyone who can reach this server spends "
                        "its Anthropic budget; %s", limits)

    # -- who is calling --------------------------------------------------------------------
    def _keyless(self, scope: Scope, headers: Headers) -> str:
        if self.mode == "local":
            if not _is_loopback_client(scope) or not _is_loopback_host(headers.get("host")):
                raise ApiError("unauthorized", "This server has no API keys configured (AGENT_API_KEYS) "
                               "and serves loopback clients only.")
        return ANONYMOUS

    def principal_for_http(self, scope: Scope, headers: Headers) -> str:
        if self.mode != "keys":
            return self._keyless(scope, headers)
        principal = self.keys.authenticate(bearer_token(headers.get("authorization")))
        if principal is None:
            raise ApiError("unauthorized")
        return principal

    async def principal_for_ws(self, scope: Scope, headers: Headers) -> str:
        if self.mode != "keys":
            return self._keyless(scope, headers)
        if headers.get("authorization") is not None:
            presented = bearer_token(headers.get("authorization"))
        elif any(p.startswith(BEARER_SUBPROTOCOL_PREFIX) for p in scope.get("subprotocols") or ()):
            presented = subprotocol_key(scope.get("subprotocols") or [])
        else:
            ticket = self.tickets.verify(QueryParams(scope.get("query_string", b"")).get("ticket"))
            if ticket is None or not await self._claim(ticket.nonce):
                raise ApiError("unauthorized", "A valid API key or an unused, unexpired ticket is required.")
            return ticket.principal
        principal = self.keys.authenticate(presented)
        if principal is None:
            raise ApiError("unauthorized")
        return principal

    def check_origin(self, headers: Headers, scope: Scope) -> None:
        """A browser's Origin must be in ALLOWED_ORIGINS (scheme, host and port), or be this
        server's own origin: the scheme the request came in by (X-Forwarded-Proto from a
        trusted proxy, as uvicorn's --proxy-headers put it in the scope; ws/wss count as
        http/https) and the Host header's host and port (the built-in chat page)."""
        origin = headers.get("origin")
        if origin is None or "*" in self.origins:
            return
        key = _origin_key(origin)
        if key is not None and (key in _origin_keys(self.origins)
                                or key == _request_origin(scope, headers.get("host"))):
            return
        raise ApiError("forbidden_origin", "This origin is not allowed (ALLOWED_ORIGINS).")

    def identity(self, scope: Scope, principal: str) -> str:
        """Who the per-request limits count: the key's principal, else the client address."""
        if principal != ANONYMOUS:
            return principal
        client = scope.get("client")
        return f"ip:{client[0]}" if client else "ip:unknown"

    # -- limits ----------------------------------------------------------------------------
    async def admit(self, scope: Scope, *, turn: bool) -> None:
        """Requests per minute for this caller; for a turn also the tokens-per-minute budget."""
        s = self.settings
        principal = scope.get(SCOPE_KEY) or ANONYMOUS
        if turn and s.rate_limit_tpm:
            wait = await self._safe(self.limiter.gcra(bucket_key(principal, "tpm"), s.rate_limit_tpm, 1, "peek"), 0)
            if wait:
                raise _rate_limited(wait, "tokens_per_minute",
                                    f"Token budget spent: the limit is {s.rate_limit_tpm} tokens per minute.")
        if s.rate_limit_rpm:
            key = bucket_key(self.identity(scope, principal), "rpm")
            wait = await self._safe(self.limiter.gcra(key, s.rate_limit_rpm, 1, "charge"), 0)
            if wait:
                raise _rate_limited(wait, "requests_per_minute",
                                    f"Too many requests: the limit is {s.rate_limit_rpm} per minute.")

    async def take_stream_slot(self, scope: Scope) -> tuple[str, str] | None:
        limit = self.settings.max_concurrent_streams_per_principal
        if not limit:
            return None
        key = bucket_key(self.identity(scope, scope.get(SCOPE_KEY) or ANONYMOUS), "streams")
        slot = secrets.token_hex(8)
        if not await self._safe(self.limiter.take_slot(key, slot, limit), True):
            raise _rate_limited(5, "concurrent_streams",
                                f"Too many open streams: at most {limit} at once per API key.")
        return key, slot

    @asynccontextmanager
    async def holding(self, slot: tuple[str, str] | None) -> AsyncIterator[None]:
        if slot is None:
            yield
            return
        renewer = asyncio.create_task(self._renew(*slot))
        try:
            yield
        finally:
            renewer.cancel()
            await self._safe(self.limiter.release_slot(*slot), None)

    async def _renew(self, key: str, slot: str) -> None:
        while True:
            await asyncio.sleep(SLOT_TTL_MS / 3000)
            await self._safe(self.limiter.renew_slot(key, slot), None)

    def charge_tokens(self, principal: str, usage: Any) -> None:
        """Engine listener: a finished turn's tokens go on its owner's per-minute budget."""
        tokens = int(getattr(usage, "total", 0) or 0)
        if not self.settings.rate_limit_tpm or tokens <= 0:
            return
        task = asyncio.get_running_loop().create_task(self._safe(
            self.limiter.gcra(bucket_key(principal, "tpm"), self.settings.rate_limit_tpm, tokens, "force"), 0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _claim(self, nonce: str) -> bool:
        """A ticket is single use: while Redis cannot say whether it was used, it is refused
        (fails closed), unlike the counters below."""
        try:
            return await self.limiter.claim_once(nonce, self.tickets.ttl + 5)
        except (RedisError, OSError, asyncio.TimeoutError):
            raise ApiError("store_unavailable") from None

    async def _safe(self, coro: Any, default: Any) -> Any:
        """Rate limits and stream slots fail open while Redis does not answer: every route
        they guard needs the same Redis for its session and answers `store_unavailable`
        then, so nothing gets through that could spend tokens."""
        try:
            return await coro
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            now = time.monotonic()
            if now - self._warned_at > 10:
                self._warned_at = now
                log.warning("rate limiter cannot reach Redis (%s); counters paused until it answers",
                            type(exc).__name__)
            return default

    # -- POST /ws-ticket -------------------------------------------------------------------
    async def ws_ticket(self, request: Request) -> Response:
        """A single-use ticket for `WS /agent/ws?ticket=...`, for browsers (which cannot set
        headers on a WebSocket). Authenticated like any request; valid ~60 s."""
        token, ticket = self.tickets.issue(principal_of(request))
        return JSONResponse({"ticket": token, "expires_in": self.tickets.ttl, "expires_at": ticket.expires},
                            headers={"Cache-Control": "no-store"})


def _rate_limited(wait: float, limit: str, message: str) -> ApiError:
    metrics.rate_limited(limit)
    return ApiError("rate_limited", message, retry_after=max(1, math.ceil(wait)), limit=limit)


def _is_loopback_client(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return True  # a unix socket
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return client[0] == "localhost"


_DEFAULT_PORTS = {"http": 80, "https": 443}
_WS_SCHEMES = {"ws": "http", "wss": "https"}


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


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return True  # HTTP/1.0 without Host: no browser sends that
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name.startswith("[") and "]" in name:
        name = name[1:name.index("]")]
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


TURN_STARTS = frozenset({"/agent", "/agent/stream", "/api/chat"})  # POST
STREAM_STARTS = frozenset({"/agent/stream", "/api/chat"})           # POST; WebSockets count too


def _is_turn_start(method: str, path: str) -> bool:
    return method == "POST" and path in TURN_STARTS


def _is_stream(method: str, path: str) -> bool:
    """SSE responses: they hold a stream slot while open."""
    return (method == "POST" and path in STREAM_STARTS) or (
        method == "GET" and path.startswith(("/sessions/", "/api/chat/")) and path.endswith("/stream"))


class SecurityMiddleware:
    """Pure ASGI (streams pass through untouched)."""

    def __init__(self, app: ASGIApp, guard: Guard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method, guard = scope["path"], scope["method"], self.guard
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            if guard.mode != "keys":
                guard.check_origin(headers, scope)  # no key: a foreign web page must not act for the user
            scope[SCOPE_KEY] = guard.principal_for_http(scope, headers)
            await guard.admit(scope, turn=_is_turn_start(method, path))
            receive, send = _limit_body(headers, receive, send, guard.settings.max_body_bytes,
                                        guard.settings.body_timeout_seconds)
            slot = await guard.take_stream_slot(scope) if _is_stream(method, path) else None
        except ApiError as exc:
            await error_response(exc)(scope, receive, send)
            return
        async with guard.holding(slot):
            await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard = self.guard
        headers = Headers(scope=scope)
        try:
            guard.check_origin(headers, scope)
            scope[SCOPE_KEY] = await guard.principal_for_ws(scope, headers)
            await guard.admit(scope, turn=False)
            slot = await guard.take_stream_slot(scope)
        except ApiError as exc:
            await _deny_websocket(scope, send, exc)
            return
        offered = scope.get("subprotocols") or []
        scope["subprotocols"] = [p for p in offered if not p.startswith(BEARER_SUBPROTOCOL_PREFIX)]

        async def send_with_subprotocol(message: Message) -> None:
            # Browsers fail a handshake that offered subprotocols and got none back: answer
            # `agent` (never the bearer one, which carries the key).
            if message["type"] == "websocket.accept" and WS_SUBPROTOCOL in offered and not message.get("subprotocol"):
                message = {**message, "subprotocol": WS_SUBPROTOCOL}
            await send(message)

        async with guard.holding(slot):
            await self.app(scope, receive, send_with_subprotocol)


def request_timeout(part: str, seconds: float) -> ApiError:
    """408 for a request head or body that did not arrive in time (HEADER_TIMEOUT_SECONDS in
    server/http_protocol.py, BODY_TIMEOUT_SECONDS below)."""
    return ApiError("request_timeout", f"The request {part} did not arrive within {seconds:g} s.")


def _limit_body(headers: Headers, receive: Receive, send: Send, limit: int,
                timeout: float) -> tuple[Receive, Send]:
    """413 `body_too_large` as JSON: from Content-Length up front, or while reading; 408
    `request_timeout` (and the connection closed) when the body is not all there `timeout`
    seconds after its head. Only the body counts: once it is complete, `receive` (an SSE
    answer waiting for the client to leave) waits as long as it likes."""
    length = headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise ApiError("body_too_large", f"The request body is larger than {limit} bytes.")
        except ValueError:
            raise ApiError("invalid_request", "Content-Length is not a number.") from None
    total = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # No Content-Length and not chunked: no body to wait for.
    complete = length in (None, "0") and "transfer-encoding" not in headers
    timed_out = False

    async def limited() -> Message:
        nonlocal total, complete, timed_out
        if complete:
            message = await receive()
        else:
            try:
                async with asyncio.timeout_at(deadline):  # (no timer fires when the body is already in)
                    message = await receive()
            except TimeoutError:
                timed_out = True
                raise request_timeout("body", timeout) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise ApiError("body_too_large", f"The request body is larger than {limit} bytes.")
        return message

    async def closing(message: Message) -> None:
        if timed_out and message["type"] == "http.response.start":  # the rest may never come
            message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        await send(message)

    return limited, (send if complete else closing)


async def _deny_websocket(scope: Scope, send: Send, exc: ApiError) -> None:
    """Refuse the handshake with a real HTTP status and our JSON error body; servers without
    the denial-response extension get a close (HTTP 403). Anyone can be refused: that is
    worth an INFO line (uvicorn's `"WebSocket /path" 401`), never an ERROR one."""
    log.debug("WebSocket handshake refused: %s", exc.code)
    handshake_refused()  # (uvicorn would log the unfinished handshake as an ERROR)
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008, "reason": exc.code})
        return
    body = json.dumps({"error": exc.payload()}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
    await send({"type": "websocket.http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


async def admit_turn(conn: HTTPConnection) -> None:
    """For transports that start turns on an open connection (WebSocket frames): the same
    per-minute limits as `POST /agent`."""
    guard: Guard | None = getattr(conn.app.state, "guard", None)
    if guard is not None:
        await guard.admit(conn.scope, turn=True)
