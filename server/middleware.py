"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer and slow every stream).

`RequestContext`, the outermost one: gives every HTTP request and WebSocket handshake a
request id (`X-Request-ID` if it is 1-128 safe characters, else a new one), echoes it on the
response (and on the WebSocket accept), keeps it in `logs.request_id`, and feeds `GET
/metrics`: requests by route template, method and status; open SSE responses and WebSockets.
"""

from __future__ import annotations

import re
import uuid

from starlette.requests import Request
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .logs import request_id
from .transports.errors import unexpected

_HEADER = b"x-request-id"
_BODY_SEND = "body_send"
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


def _route_of(scope: Scope) -> str:
    """The route template (bounded label values), also for requests refused before routing."""
    route = scope.get("route") or match_route(scope)[0]
    path = getattr(route, "path", None)
    if path is None:
        return "<unmatched>"
    return path + "/{path}" if isinstance(route, Mount) else path


def body_send(scope: Scope, send: Send) -> Send:
    """Where to write the body of a response already started through `send`: `RequestContext`'s
    own `send`. Once a response has started, the middleware inside it (CORS, security,
    Starlette's exception handling, ours) only pass body messages on: a long stream skips
    them for each of its writes (four calls per write saved)."""
    return scope.get("state", {}).get(_BODY_SEND, send)


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == _HEADER), None)
        rid = rid if rid and _SAFE_ID.fullmatch(rid) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        if kind == "http":  # (a WebSocket's messages must all pass the middleware)
            state[_BODY_SEND] = send
        token = request_id.set(rid)
        status: int | None = None
        live = None  # the gauge child counting this stream or socket while it is open
        header = (_HEADER, rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, live
            mtype = message["type"]
            if mtype in ("http.response.start", "websocket.accept", "websocket.http.response.start"):
                message = {**message, "headers": [*message.get("headers", ()), header]}
                status = message.get("status", 101)
                sse = mtype == "http.response.start" and status == 200 and \
                    dict(message["headers"]).get(b"content-type", b"").startswith(b"text/event-stream")
                if sse or mtype == "websocket.accept":
                    live = metrics.live_connection(not sse, _route_of(scope))
                    live.inc()
            elif mtype == "websocket.close" and status is None:
                status = 403  # refused before the handshake completed
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if status is not None or kind != "http":
                raise
            # Unhandled errors are answered by Starlette's outermost error middleware, past
            # this one: answer here instead so the 500 carries the id too.
            response = await unexpected(Request(scope), exc)
            await response(scope, receive, send_with_id)
        finally:
            if live is not None:
                live.dec()
            request_id.reset(token)
            metrics.http_request("WS" if kind == "websocket" else scope.get("method", ""),
                                 _route_of(scope), status or 500)
