"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer and slow every stream).

`RequestContext`, the outermost one: gives every HTTP request and WebSocket handshake a
request id (`X-Request-ID`, validated, else generated), echoes it on the response (and on the
WebSocket accept), keeps it in a context variable for the logs, and feeds `GET /metrics`:
requests by route template, method and status; open SSE responses (any `text/event-stream`
answer) and open WebSockets, by route. Per request it costs a header scan and a counter.

It also leaves its own `send` in the scope for `body_send`: once a response has started,
the middleware inside it (CORS, security, Starlette's exception handling, this one) only
pass body messages on, so a long stream can skip them for each of its writes.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .logs import accept_request_id, request_id

_HEADER = b"x-request-id"
_BODY_SEND = "body_send"


def match_route(scope: Scope) -> tuple[BaseRoute | None, bool]:
    """The route the router will take, before routing (for the security policy and for the
    metrics of refused requests): the first full match, else the first partial one (a wrong
    method: the router's 405), and whether it matched fully."""
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
    """Where to write the body of a response already started through `send`: past the
    middleware that only look at `http.response.start` (four calls per write saved)."""
    return scope.get("state", {}).get(_BODY_SEND, send)


def _is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.startswith(b"text/event-stream")
    return False


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == _HEADER), None)
        rid = accept_request_id(incoming)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        if kind == "http":
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
                if mtype == "websocket.accept":
                    live = metrics.live_connection(True, _route_of(scope))
                    live.inc()
                elif mtype == "http.response.start" and status == 200 and _is_event_stream(message["headers"]):
                    live = metrics.live_connection(False, _route_of(scope))
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
            from starlette.requests import Request

            from .transports.errors import unexpected

            response = await unexpected(Request(scope), exc)
            await response(scope, receive, send_with_id)
        finally:
            if live is not None:
                live.dec()
            request_id.reset(token)
            metrics.http_request("WS" if kind == "websocket" else scope.get("method", ""),
                                 _route_of(scope), status or 500)
