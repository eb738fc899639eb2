"""The gate in front of every route: origin, auth, rate limits, body size, stream slot.

Modes (README "Security"), chosen at startup: `keys` (AGENT_API_KEYS), `local` (no keys:
loopback clients naming a loopback Host only, so no DNS rebinding) and `disabled`. Each
route's policy is marked where server/app.py lists it (`public`, `starts_turn`,
`opens_stream`); other routes and unknown paths get the default checks. Order: origin
(WebSocket always, HTTP when keyless) -> auth -> tokens/minute (turn starts) ->
requests/minute -> body size (HTTP) -> a stream slot.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, TypeVar

from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings, is_loopback
from ..errors import ApiError, error_response
from ..middleware import match_route
from .keys import (ANONYMOUS, BEARER_SUBPROTOCOL, SCOPE_KEY, WS_SUBPROTOCOL, KeyRing, TicketSigner,
                   bearer_token, principal_of, ticket_secret)
from .limits import Limits, RedisLimiter
from .origins import check_origin
from .redaction import handshake_refused, install_log_redaction

log = logging.getLogger("server.security")

R = TypeVar("R", bound=BaseRoute)


def _marker(flag: str) -> Callable[[R], R]:
    def mark(route: R) -> R:
        route.policy = getattr(route, "policy", frozenset()) | {flag}  # type: ignore[attr-defined]
        return route
    return mark


public = _marker("public")          # anyone may call it over HTTP: no key, origin check or limit
starts_turn = _marker("turn")       # refused while the caller's tokens-per-minute budget is spent
opens_stream = _marker("stream")    # holds one of the caller's concurrent stream slots while open


def _policy(scope: Scope) -> frozenset[str]:
    """The marks of the route this request goes to. A partial match (a wrong method) keeps
    only `public`: the router answers it with a 405 that starts nothing."""
    route, full = match_route(scope)
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
        self.origins = frozenset(settings.allowed_origins)
        self.limits = Limits(settings)
        install_log_redaction()

    @asynccontextmanager
    async def attached(self, engine: Any) -> AsyncIterator["Guard"]:
        """Share counters through Redis when configured; charge finished turns' tokens."""
        if self.settings.redis_url:  # the store's client and pool: a burst waits for a connection
            self.limits.backend = RedisLimiter(engine.store.redis)
        engine.turn_listeners.append(self.limits.charge_tokens)
        self._log_mode()
        try:
            yield self
        finally:
            await self.limits.drain()

    def _log_mode(self) -> None:
        s = self.settings
        says = {"keys": f"auth: API keys required ({len(self.keys)} configured)",
                "local": "auth: OFF for local development (no AGENT_API_KEYS): loopback clients only, as 'anonymous'",
                "disabled": "auth: DISABLED (AUTH_DISABLED=true): anyone who can reach this server spends its "
                            "Anthropic budget"}[self.mode]
        log.log(logging.INFO if self.mode == "keys" else logging.WARNING,
                "%s; rpm=%s tpm=%s streams/principal=%s upstream/worker=%s origins=%s", says,
                s.rate_limit_rpm or "off", s.rate_limit_tpm or "off", s.max_concurrent_streams_per_principal or "off",
                s.max_concurrent_upstream, ",".join(s.allowed_origins) or "none")

    async def principal(self, scope: Scope, headers: Headers) -> str:
        """Who is calling; a WebSocket may also present its key as a subprotocol or a ticket."""
        if self.mode != "keys":
            if self.mode == "local" and not _from_loopback(scope, headers.get("host")):
                raise ApiError("unauthorized", "This server has no API keys configured (AGENT_API_KEYS) "
                               "and serves loopback clients only.")
            return ANONYMOUS
        presented = bearer_token(headers.get("authorization"))
        if scope["type"] == "websocket" and "authorization" not in headers:
            offered = [p for p in scope.get("subprotocols") or () if p.startswith(BEARER_SUBPROTOCOL)]
            if not offered:
                ticket = self.tickets.verify(QueryParams(scope.get("query_string", b"")).get("ticket"))
                if ticket is None or not await self.limits.claim(ticket.nonce, self.tickets.ttl + 5):
                    raise ApiError("unauthorized", "A valid API key or an unused, unexpired ticket is required.")
                return ticket.principal
            presented = offered[0][len(BEARER_SUBPROTOCOL):] or None
        principal = self.keys.authenticate(presented)
        if principal is None:
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
    """For transports that start turns on an open connection (WebSocket frames): the same
    per-minute limits as `POST /agent`."""
    guard: Guard | None = getattr(conn.app.state, "guard", None)
    if guard is not None:
        await guard.limits.admit(conn.scope, turn=True)


class SecurityMiddleware:
    """Pure ASGI (streams pass through untouched)."""

    def __init__(self, app: ASGIApp, guard: Guard):
        self.app = app
        self.guard = guard

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
            slot = await guard.limits.take_stream_slot(scope) if "stream" in policy else None
        except ApiError as exc:
            if kind == "http":
                await error_response(exc)(scope, receive, send)
            else:
                await _deny_websocket(scope, receive, send, exc)
            return
        if kind == "websocket":
            send = _answer_subprotocol(scope, send)
        async with guard.limits.holding(slot):
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
    without the denial-response extension get a close (HTTP 403). Anyone can be refused:
    that is worth an INFO line (uvicorn's `"WebSocket /path" 401`), never an ERROR one."""
    log.debug("WebSocket handshake refused: %s", exc.code)
    handshake_refused()  # (uvicorn would log the unfinished handshake as an ERROR)
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await error_response(exc)(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": exc.code})


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
