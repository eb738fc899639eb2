"""The one turn forwarder, for SSE and WebSocket alike.

`Forward.run` pumps a turn's event batches (`Engine.follow`) into a sink, one write a batch:
`EventStream` (every SSE route) or `FramedSocket` (both WebSocket handlers), framed for /agent
(sse.py, websocket.py) or as AI SDK UI message chunks for /api/chat (ai_sdk.py, ai_sdk_ws.py).
A framing has `frames(batch)` (bytes for SSE, texts for WebSocket), `closing()` after the terminal
event or an early end, and for WebSocket an `opening` text or None (a `Framing`, or `UIChunks`).
A framing with `pause_closing()` (the AI SDK's) also ends its stream where the turn pauses for the
client (approval, client tools): when a batch ends with the event that completed a pause
(`paused_seq`), `pause_closing()` is written instead and the stream is over (the turn waits on).
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from types import SimpleNamespace
from typing import Any, AsyncGenerator, Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from .. import tracing
from ..engine import Engine
from ..errors import ApiError
from ..events import Event
from ..middleware import body_send, count_body_bytes, route_of
from ..security import principal_of
from .errors import internal_error
from .http_api import error_event_response

Framing = SimpleNamespace  # (a stateless framing, of the attributes the module docstring names)
SOCKET_GONE = (WebSocketDisconnect, RuntimeError, OSError)  # (what a send to a WebSocket that went away raises)


class Forward:
    """One client following one turn from after `after_seq`."""

    __slots__ = ("engine", "session_id", "turn_id", "events", "framing", "cancel_on_disconnect", "started", "finished",
                 "task", "pausable")

    def __init__(self, engine: Engine, session_id: str, turn_id: str, framing: Any, after_seq: int = 0,
                 cancel_on_disconnect: bool = False, started: bool = False):
        self.engine = engine
        self.session_id = session_id
        self.turn_id = turn_id
        self.events: AsyncGenerator[list[Event], None] = engine.follow(session_id, turn_id, after_seq)
        self.framing = framing
        self.cancel_on_disconnect = cancel_on_disconnect
        self.started = started  # this client started the turn (a resume did not)
        self.finished = False  # the stream ended as it should: nothing to abandon
        self.task: asyncio.Task[None] | None = None  # (a WebSocket's forwards run as tasks)
        self.pausable = hasattr(framing, "pause_closing")  # (its stream ends at a pause)

    async def run(self, sink: EventStream | FramedSocket, first: list[Event] | None = None) -> None:
        """Write `first` (already taken from the follow), then each batch, until `write` says
        the stream is over or the follow ends (then `end`). Empty batches are heartbeat ticks."""
        events, framing = self.events, self.framing
        try:
            if not (first and await sink.write(first, framing)):
                async for batch in events:
                    if not batch:
                        await sink.heartbeat()
                    elif await sink.write(batch, framing):
                        break
                else:
                    await sink.end(framing)
            self.finished = True
        finally:
            await events.aclose()

    async def abandon(self) -> None:
        """The client left: cancel the turn if it asked for that and its stream had not ended."""
        if self.cancel_on_disconnect and not self.finished:
            await self.engine.cancel_turn(self.session_id, self.turn_id)


async def open_stream(engine: Engine, session_id: str, turn_id: str | None, framing: Any,
                      headers: list[tuple[bytes, bytes]], *, after_seq: int = 0, wait: bool = True,
                      error_status: bool = False, cancel_on_disconnect: bool = False) -> Response:
    """The SSE answer for following a turn; 204 when there is no turn, or (`wait`) nothing after
    `after_seq`. `wait` holds the head for the first events (a heartbeat interval at most) so that,
    with `error_status`, an error before any event (bad key, busy...) gets its HTTP status and JSON."""
    if turn_id is None:
        return Response(status_code=204)
    stream = EventStream(engine, session_id, turn_id, framing, after_seq, cancel_on_disconnect)
    first = None
    if wait:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + engine.settings.heartbeat_seconds
        try:  # (the first events, or after `deadline` a heartbeat tick)
            while first is None or not first and loop.time() < deadline:
                first = await anext(stream.events)
        except StopAsyncIteration:
            return Response(status_code=204)  # nothing after that id: the client is up to date
        if error_status and first and first[0].type == "error":
            await stream.events.aclose()
            return error_event_response(json.loads(first[0].data), session_id, turn_id)
    stream.first = first
    stream.headers = [*headers, (b"x-session-id", session_id.encode()), (b"x-turn-id", turn_id.encode())]
    return stream


class EventStream(Forward):
    """A `text/event-stream` response following a turn, its own sink: one send per batch, no anyio
    task group or body generator. A small task cancels the pump when the client leaves (uvicorn
    drops writes to a closed connection silently: a stream would run on to its end for nobody)."""

    __slots__ = ("first", "headers", "send", "sent")  # (the events already taken; the raw ASGI head; body bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        # The body is pumped by its own task: waking it resumes a short stack, not this request's
        # (server, middleware, routing), and its writes skip the middleware that only see the start.
        self.send = body_send(scope, send)
        self.sent = 0  # (for the access log: these writes pass no middleware that could count them)
        pump = asyncio.create_task(self.run(self, self.first))
        watcher = asyncio.create_task(self._watch(receive, pump))
        try:
            await pump  # (cancelling this request cancels the pump, which ends before we resume)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]  # (always in a task)
                raise  # this request was cancelled
            # only the pump was: the client left, and the response is simply over
        finally:
            watcher.cancel()
            count_body_bytes(scope, self.sent)
            await self.abandon()

    @staticmethod
    async def _watch(receive: Receive, pump: asyncio.Task[None]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        pump.cancel()  # the client left

    async def heartbeat(self) -> None:
        await self._body(b": keep-alive\n\n", True)

    async def write(self, batch: list[Event], framing: Any) -> bool:
        body, last = framing.frames(batch), batch[-1]
        if last.terminal:  # (the terminal batch also ends the body)
            await self._body(body + framing.closing(), False)
            return True
        if self.pausable and framing.paused_seq == last.seq:  # the turn waits for the client's answer
            await self._body(body + framing.pause_closing(), False)
            return True
        await self._body(body, True)
        return False

    async def end(self, framing: Any) -> None:
        await self._body(framing.closing(), False)

    async def _body(self, body: bytes, more: bool) -> None:
        self.sent += len(body)
        await self.send({"type": "http.response.body", "body": body, "more_body": more})


class FramedSocket:
    """One WebSocket connection: the receive loop, one send at a time, a bad frame answered without
    ending the connection, and the turns it follows (by key, each forward a task; a new one replaces
    the old one; the close abandons them). Subclasses set `log`, answer `handle(text)`, `binary_frame()`."""

    where = "WebSocket"  # (names the frames in the log line of an unexpected failure)

    def __init__(self, ws: WebSocket, engine: Engine):
        self.ws = ws
        self.engine = engine
        self.principal = principal_of(ws)
        self.forwards: dict[Any, Forward] = {}
        self._send_lock = asyncio.Lock()

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)

    async def receive_frames(self) -> None:
        """The receive loop of the accepted connection, until the client leaves."""
        try:
            while (message := await self.ws.receive())["type"] != "websocket.disconnect":
                if message.get("text") is None:
                    await self.binary_frame()
                elif tracing.enabled:  # a span per frame: the turn a frame starts is its child
                    scope = self.ws.scope
                    with tracing.ws_message(route_of(scope), scope.get("state", {}).get("request_id")):
                        await self.handle(message["text"])
                else:
                    await self.handle(message["text"])
        except WebSocketDisconnect:
            pass
        finally:
            for forward in list(self.forwards.values()):
                if not forward.task.done():
                    forward.task.cancel()
                    await forward.abandon()
            self.forwards.clear()

    async def answering(self, handling: Awaitable[None], error_frame: Callable[[ApiError], str]) -> None:
        """Await the handling of one client frame: a bad one is answered with the `error_frame` of its
        error; an unexpected failure is logged once and answered `internal`, never ending the socket."""
        try:
            await handling
        except ApiError as exc:
            if tracing.enabled:
                tracing.record_error(exc.code)
            await self.send(error_frame(exc))
        except WebSocketDisconnect:
            raise  # the client left: the receive loop ends
        except Exception as exc:  # noqa: BLE001 — one bad frame must never end the connection
            if isinstance(exc, (RuntimeError, OSError)) and self.ws.application_state != WebSocketState.CONNECTED:
                return  # a send merely raced the socket closing
            error = internal_error(exc)
            if tracing.enabled:
                tracing.record_error(error.code)
            if error.code == "internal":
                self.log.exception(f"unexpected error handling a {self.where} frame", exc_info=exc)
            with suppress(*SOCKET_GONE):  # (if the socket went away meanwhile, the receive loop sees it)
                await self.send(error_frame(error))

    def follow(self, key: Any, session_id: str, turn_id: str, framing: Any, after_seq: int = 0,
               cancel_on_disconnect: bool = False, started: bool = False) -> None:
        """Send the framing's `opening`, then follow the turn (a `Forward` of these arguments) under `key`."""
        self.stop(key)
        forward = Forward(self.engine, session_id, turn_id, framing, after_seq, cancel_on_disconnect, started)
        forward.task = asyncio.create_task(self._pump(key, forward))
        self.forwards[key] = forward

    def stop(self, key: Any) -> Forward | None:
        """Stop following under `key` (the turn goes on); the forward that was stopped."""
        forward = self.forwards.pop(key, None)
        if forward is not None:
            forward.task.cancel()
        return forward

    async def _pump(self, key: Any, forward: Forward) -> None:
        try:
            if forward.framing.opening is not None:
                await self.send(forward.framing.opening)
            await forward.run(self)
        except SOCKET_GONE:
            pass  # the socket went away; the turn goes on and can be resumed
        finally:  # (a forward in `forwards` is one still running)
            if self.forwards.get(key) is forward:
                del self.forwards[key]

    async def heartbeat(self) -> None:
        pass  # the connection's pings keep it alive

    async def write(self, batch: list[Event], framing: Any) -> bool:
        for text in framing.frames(batch):
            await self.send(text)
        return False

    async def end(self, framing: Any) -> None:
        for text in framing.closing():
            await self.send(text)
