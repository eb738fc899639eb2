"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer and slow every stream).

`RequestContext`, the outermost one: gives every HTTP request and WebSocket handshake a
request id (`X-Request-ID` if it is 1-128 safe characters, else a new one), echoes it on the
response (and on the WebSocket accept), keeps it in `logs.request_id`, and feeds `GET
/metrics`: requests by route template, method and status; open SSE responses and WebSockets.
It writes the access log, one JSON line per request or WebSocket connection (logger
`server.access`; uvicorn's own access log is off), and with tracing on (server/tracing.py)
holds the request's SERVER span, current while the app runs.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.requests import Request
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics, tracing
from .logs import redact, request_id
from .transports.errors import unexpected

_HEADER = b"x-request-id"
_BODY_SEND = "body_send"
_BODY_BYTES = "body_bytes"  # (bytes a response wrote through `body_send`, past this middleware)
# security.keys.SCOPE_KEY, set once the caller is authenticated (not imported: the security
# package imports this module)
_PRINCIPAL = "agent.principal"
_MAX_LOGGED_PATH = 1024
_UNMATCHED = "<unmatched>"
access_log = logging.getLogger("server.access")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")  # nothing that could split a log line or a header


def match_route(scope: Scope) -> tuple[BaseRoute | None, bool]:
    """The route the router will take, before routing: the first full match, else the first
    partial one (a wrong method: the router's 405), and whether it matched fully."""
    partial = None
    for route in getattr(scope.get("app"), "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route, True
        if match == Match.PARTIAL and partial is None:
            partial = route
    return partial, False


def route_of(scope: Scope) -> str:
    """The route template (bounded label values), also for requests refused before routing."""
    route = scope.get("route") or match_route(scope)[0]
    path = getattr(route, "path", None)
    if path is None:
        return _UNMATCHED
    return path + "/{path}" if isinstance(route, Mount) else path


def body_send(scope: Scope, send: Send) -> Send:
    """Where to write the body of a response already started through `send`: `RequestContext`'s
    own `send`. Once a response has started, the middleware inside it (CORS, security,
    Starlette's exception handling, ours) only pass body messages on: a long stream skips
    them for each of its writes (four calls per write saved)."""
    return scope.get("state", {}).get(_BODY_SEND, send)


def count_body_bytes(scope: Scope, sent: int) -> None:
    """A response that wrote its body through `body_send` says how much, for the access log."""
    state = scope.get("state")
    if state is not None:
        state[_BODY_BYTES] = state.get(_BODY_BYTES, 0) + sent


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == _HEADER), None)
        rid = rid if rid and _SAFE_ID.fullmatch(rid) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        if kind == "http":  # (a WebSocket's messages must all pass the middleware)
            state[_BODY_SEND] = send
        token = request_id.set(rid)
        status: int | None = None
        sent = 0  # response body bytes through this middleware (HTTP)
        live = None  # the gauge child counting this stream or socket while it is open
        header = (_HEADER, rid.encode())
        span = tracing.start_request(scope, rid) if tracing.enabled else None
        failure: BaseException | None = None

        def started_response(message: Message) -> Message:
            nonlocal status, live
            message = {**message, "headers": [*message.get("headers", ()), header]}
            status = message.get("status", 101)
            sse = message["type"] == "http.response.start" and status == 200 and \
                dict(message["headers"]).get(b"content-type", b"").startswith(b"text/event-stream")
            if sse or message["type"] == "websocket.accept":
                live = metrics.live_connection(not sse, route_of(scope))
                live.inc()
            return message

        if kind == "http":
            async def send_with_id(message: Message) -> None:
                nonlocal sent
                mtype = message["type"]
                if mtype == "http.response.body":
                    sent += len(message.get("body", b""))
                elif mtype == "http.response.start":
                    message = started_response(message)
                await send(message)
        else:
            async def send_with_id(message: Message) -> None:  # (every frame of the socket passes here)
                nonlocal status
                mtype = message["type"]
                if mtype in ("websocket.accept", "websocket.http.response.start"):
                    message = started_response(message)
                elif mtype == "websocket.close" and status is None:
                    status = 403  # refused before the handshake completed
                await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            failure = exc
            if status is not None or kind != "http":
                raise
            # Unhandled errors are answered by Starlette's outermost error middleware, past
            # this one: answer here instead so the 500 carries the id too.
            response = await unexpected(Request(scope), exc)
            await response(scope, receive, send_with_id)
        finally:
            if live is not None:
                live.dec()
            method = "WS" if kind == "websocket" else scope.get("method", "")
            route = route_of(scope)
            metrics.http_request(method, route, status or 500)
            if access_log.isEnabledFor(logging.INFO):
                _access_line(scope, method, route, status or 500, started, sent + state.get(_BODY_BYTES, 0), rid,
                             kind == "websocket", span)
            if span is not None:
                tracing.end_request(span, kind == "websocket", method, None if route == _UNMATCHED else route,
                                    status or 500, failure)
            request_id.reset(token)


def _access_line(scope: Scope, method: str, route: str, status: int, started: float, sent: int, rid: str,
                 websocket: bool, span: tuple | None) -> None:
    """The access log line: no query string (it can carry a ticket), no headers."""
    path = scope.get("path", "")
    path = redact(path[:_MAX_LOGGED_PATH] + "..." if len(path) > _MAX_LOGGED_PATH else path)
    fields = {"event": "access", "method": method, "path": path,
              "route": route, "status": status, "duration_ms": round((time.perf_counter() - started) * 1000, 1)}
    if not websocket:
        fields["bytes"] = sent
    fields["request_id"] = rid
    if principal := scope.get(_PRINCIPAL):
        fields["principal"] = principal
    if span is not None and (trace_id := tracing.trace_id(span[0])):
        fields["trace_id"] = trace_id
    access_log.info("%s %s %s", method, path, status, extra={"fields": fields})
