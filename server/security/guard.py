"""The gate in front of every route: origin, auth, rate limits, body size, stream slot; and CORS.

Modes and origins: README "Security". Each route's policy is marked where server/app.py lists
it (`public`, `starts_turn`, `opens_stream`); other routes and unknown paths get the default
checks. Order: origin (WebSocket always, HTTP when keyless: without keys the network position
is the only credential, so no web page may act for the user) -> auth -> tokens/minute (turn
starts) -> requests/minute -> body size (HTTP) -> a stream slot.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager, nullcontext
from functools import partial
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings, is_loopback
from ..errors import ApiError, error_response
from ..logs import handshake_refused
from ..middleware import match_route
from .keys import (ANONYMOUS, BEARER_SUBPROTOCOL, SCOPE_KEY, WS_SUBPROTOCOL, KeyRing, TicketSigner, principal_of,
                   ticket_secret)
from .limits import Limits, RedisLimiter

log = logging.getLogger("server.security")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _mark(flag: str, route: BaseRoute) -> BaseRoute:
    route.policy = getattr(route, "policy", frozenset()) | {flag}  # type: ignore[attr-defined]
    return route


public = partial(_mark, "public")          # anyone may call it over HTTP: no key, origin check or limit
starts_turn = partial(_mark, "turn")       # refused while the caller's tokens-per-minute budget is spent
opens_stream = partial(_mark, "stream")    # holds one of the caller's concurrent stream slots while open


def _policy(scope: Scope) -> frozenset[str]:
    """The marks of the route this request goes to. A partial match (a wrong method) keeps
    only `public`: the router answers it with a 405 that starts nothing. The route is kept
    in the scope, so the metrics of a refused request need not match it again."""
    route, full = match_route(scope)
    if route is None:
        return frozenset()
    scope["route"] = route  # (the router sets the same)
    marks = getattr(route, "policy", frozenset())
    return marks if full else marks & {"public"}


class Guard:
    """One per worker: the key ring, the ticket signer and the limits."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = KeyRing(settings.api_keys)
        self.mode = "keys" if len(self.keys) else ("disabled" if settings.auth_disabled else "local")
        self.tickets = TicketSigner(ticket_secret(settings.ticket_secret, self.keys, settings.anthropic_api_key),
                                    settings.ws_ticket_ttl_seconds)
        # ALLOWED_ORIGINS as (scheme, host, port) for `check_origin`; None for `*` (any)
        self.origins = None if "*" in settings.allowed_origins else frozenset(
            k for k in map(_origin_key, settings.allowed_origins) if k is not None)
        self.limits = Limits(settings)

    @asynccontextmanager
    async def attached(self, engine: Any) -> AsyncIterator["Guard"]:
        """Share counters through Redis when configured; charge finished turns' tokens."""
        if self.settings.redis_url:  # the store's client and pool: a burst waits for a connection
            self.limits.backend = RedisLimiter(engine.store.redis)
        engine.turn_listeners.append(self.limits.charge_tokens)
        s = self.settings
        says = {"keys": f"auth: API keys required ({len(self.keys)} configured)",
                "local": "auth: OFF for local development (no AGENT_API_KEYS): loopback clients only, as 'anonymous'",
                "disabled": "auth: DISABLED (AUTH_DISABLED=true): anyone who can reach this server spends its "
                            "Anthropic budget"}[self.mode]
        log.log(logging.INFO if self.mode == "keys" else logging.WARNING,
                "%s; rpm=%s tpm=%s streams/principal=%s upstream/worker=%s origins=%s", says,
                s.rate_limit_rpm or "off", s.rate_limit_tpm or "off", s.max_concurrent_streams_per_principal or "off",
                s.max_concurrent_upstream, ",".join(s.allowed_origins) or "none")
        try:
            yield self
        finally:
            await self.limits.drain()

    async def principal(self, scope: Scope, headers: Headers) -> str:
        """Who is calling; a WebSocket may also present its key as a subprotocol or a ticket."""
        if self.mode != "keys":
            if self.mode == "local" and not _from_loopback(scope, headers.get("host")):
                raise ApiError("unauthorized", "This server has no API keys configured (AGENT_API_KEYS) "
                               "and serves loopback clients only.")
            return ANONYMOUS
        scheme, _, token = (headers.get("authorization") or "").strip().partition(" ")
        presented = (token.strip() or None) if scheme.lower() == "bearer" else None
        if scope["type"] == "websocket" and "authorization" not in headers:
            offered = [p for p in scope.get("subprotocols") or () if p.startswith(BEARER_SUBPROTOCOL)]
            if not offered:
                ticket = self.tickets.verify(QueryParams(scope.get("query_string", b"")).get("ticket"))
                if ticket is None or not await self.limits.claim(ticket.nonce, self.tickets.ttl + 5):
                    raise ApiError("unauthorized", "A valid API key or an unused, unexpired ticket is required.")
                return ticket.principal
            presented = offered[0][len(BEARER_SUBPROTOCOL):] or None
        if (principal := self.keys.authenticate(presented)) is None:
            raise ApiError("unauthorized")
        return principal

    async def ws_ticket(self, request: Request) -> Response:
        """`POST /ws-ticket`: a single-use ticket for `WS /agent/ws?ticket=...`, for browsers
        (which cannot set headers on a WebSocket). Authenticated like any request."""
        token, ticket = self.tickets.issue(principal_of(request))
        return JSONResponse({"ticket": token, "expires_in": self.tickets.ttl, "expires_at": ticket.expires},
                            headers={"Cache-Control": "no-store"})


def _from_loopback(scope: Scope, host: str | None) -> bool:
    """A loopback client (or a unix socket) that named this machine in its Host header (or
    sent none: HTTP/1.0, which no browser does), so no DNS rebinding."""
    client = scope.get("client")
    if client and not is_loopback(client[0]):
        return False
    return not host or is_loopback(host if host.endswith("]") else host.rsplit(":", 1)[0])


async def admit_turn(conn: HTTPConnection) -> None:
    """For turns started on an open connection (WebSocket frames): the limits of `POST /agent`."""
    guard: Guard | None = getattr(conn.app.state, "guard", None)
    if guard is not None:
        await guard.limits.admit(conn.scope, turn=True)


class SecurityMiddleware:
    """Pure ASGI (streams pass through untouched)."""

    def __init__(self, app: ASGIApp, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        policy = _policy(scope) if kind in ("http", "websocket") else {"public"}
        if "public" in policy and kind != "websocket":
            await self.app(scope, receive, send)
            return
        guard, headers = self.guard, Headers(scope=scope)
        try:
            if kind == "websocket" or guard.mode != "keys":
                check_origin(guard.origins, headers, scope)  # no key: a foreign page must not act for the user
            scope[SCOPE_KEY] = await guard.principal(scope, headers)
            await guard.limits.admit(scope, turn="turn" in policy)
            if kind == "http":
                receive, send = _limit_body(headers, receive, send, guard.settings.max_body_bytes,
                                            guard.settings.body_timeout_seconds)
            slot = await guard.limits.take_stream_slot(scope) if "stream" in policy else nullcontext()
        except ApiError as exc:
            if kind == "http":
                await error_response(exc)(scope, receive, send)
            else:
                await _deny_websocket(scope, receive, send, exc)
            return
        if kind == "websocket":
            send = _answer_subprotocol(scope, send)
        async with slot:
            await self.app(scope, receive, send)


def _answer_subprotocol(scope: Scope, send: Send) -> Send:
    """Browsers fail a handshake that offered subprotocols and got none back: answer `agent`
    (never the bearer one, which carries the key, and which the app does not see)."""
    offered = scope.get("subprotocols") or []
    scope["subprotocols"] = [p for p in offered if not p.startswith(BEARER_SUBPROTOCOL)]

    async def send_with_subprotocol(message: Message) -> None:
        if message["type"] == "websocket.accept" and WS_SUBPROTOCOL in offered and not message.get("subprotocol"):
            message = {**message, "subprotocol": WS_SUBPROTOCOL}
        await send(message)

    return send_with_subprotocol


async def _deny_websocket(scope: Scope, receive: Receive, send: Send, exc: ApiError) -> None:
    """Refuse the handshake with the same HTTP status and JSON error as over HTTP; servers
    without the denial-response extension get a close (HTTP 403)."""
    log.debug("WebSocket handshake refused: %s", exc.code)
    handshake_refused.set(True)  # (uvicorn would log the unfinished handshake as an ERROR)
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await error_response(exc)(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": exc.code})


def _limit_body(headers: Headers, receive: Receive, send: Send, limit: int,
                timeout: float) -> tuple[Receive, Send]:
    """413 `body_too_large` as JSON: from Content-Length up front, or while reading; 408
    `request_timeout` (and the connection closed) when the body is not all there `timeout`
    seconds after its head. Only the body counts: once it is complete, `receive` (an SSE
    answer waiting for the client to leave) waits as long as it likes."""
    length = headers.get("content-length")
    try:
        if length is not None and int(length) > limit:
            raise ApiError("body_too_large", f"The request body is larger than {limit} bytes.")
    except ValueError:
        raise ApiError("invalid_request", "Content-Length is not a number.") from None
    total = 0
    deadline = asyncio.get_running_loop().time() + timeout
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
                raise ApiError("request_timeout", f"The request body did not arrive within {timeout:g} s.") from None
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


def cors_options(settings: Settings) -> dict[str, Any]:
    """For `AllowlistCORS`. No credentials ever (keys travel in headers): `*` leaks nothing."""
    return dict(allow_origins=list(settings.allowed_origins), allow_credentials=False,
                allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
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


def check_origin(allowed: frozenset[tuple[str, str, int]] | None, headers: Headers, scope: Scope) -> None:
    """A browser's Origin must be in ALLOWED_ORIGINS (scheme, host and port), or be this
    server's own origin: the scheme the request came in by (X-Forwarded-Proto from a
    trusted proxy, as uvicorn's --proxy-headers put it in the scope; ws/wss count as
    http/https) and the Host header's host and port (the built-in chat page)."""
    origin, host = headers.get("origin"), headers.get("host")
    if origin is None or allowed is None:
        return
    key = _origin_key(origin)
    scheme = str(scope.get("scheme") or "http").lower().replace("ws", "http")  # ws(s) -> http(s)
    if key is not None and (key in allowed or host and "/" not in host and key == _origin_key(f"{scheme}://{host}")):
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
    if (scheme := parts.scheme) not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc or parts.path \
            or parts.query or parts.fragment:
        return None
    return scheme, parts.hostname, port or _DEFAULT_PORTS[scheme]

