"""The one turn forwarder, for SSE and WebSocket alike.

`Forward.run` is the pump: a turn's event batches (`Engine.follow`) into a sink, one write
per batch, heartbeat ticks passed on, the follower always closed; `Forward.abandon` is
`cancel_on_disconnect`. The sinks are `EventStream` (every SSE route, via `open_stream`) and
`FramedSocket` (the base of both WebSocket handlers). They write what the forward's framing
makes of the batches, so a protocol is its framings: Anthropic-style events for /agent
(sse.py, websocket.py), AI SDK UI message chunks for /api/chat (ai_sdk.py, ai_sdk_ws.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncGenerator, Awaitable, Callable, Iterable, Protocol, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..engine import Engine
from ..errors import ApiError
from ..events import Event
from ..middleware import body_send
from ..security import principal_of
from .errors import internal_error
from .http_api import error_event_response

HEARTBEAT = b": keep-alive\n\n"
T = TypeVar("T", covariant=True)


class Framing(Protocol[T]):
    def frames(self, batch: list[Event]) -> T: ...  # bytes (SSE) or text frames (WebSocket)

    def closing(self) -> T: ...  # after the terminal event, or a follow that ended early


class Forward:
    """One client following one turn from after `after_seq`."""

    __slots__ = ("engine", "turn_id", "events", "framing", "cancel_on_disconnect", "started", "finished", "task")

    def __init__(self, engine: Engine, session_id: str, turn_id: str, framing: Framing[Any], after_seq: int = 0,
                 cancel_on_disconnect: bool = False, started: bool = False):
        self.engine = engine
        self.turn_id = turn_id
        self.events: AsyncGenerator[list[Event], None] = engine.follow(session_id, turn_id, after_seq)
        self.framing = framing
        self.cancel_on_disconnect = cancel_on_disconnect
        self.started = started  # this client started the turn (a resume did not)
        self.finished = False  # the stream ended as it should: nothing to abandon
        self.task: asyncio.Task[None] | None = None  # (a WebSocket's forwards run as tasks)

    async def run(self, sink: EventStream | FramedSocket, first: list[Event] | None = None) -> None:
        """Write `first` (events already taken from the follow), then each batch, until the
        sink's `write` says the stream is over or the follow ends (then its `end`)."""
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

    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def abandon(self) -> None:
        """The client left: cancel the turn if it asked for that and its stream had not ended."""
        if self.cancel_on_disconnect and not self.finished:
            await self.engine.cancel_turn(self.turn_id)


# -- SSE -----------------------------------------------------------------------------------
async def open_stream(engine: Engine, session_id: str, turn_id: str | None, framing: Framing[bytes],
                      headers: list[tuple[bytes, bytes]], *, after_seq: int = 0, wait: bool = True,
                      error_status: bool = False, cancel_on_disconnect: bool = False) -> Response:
    """The SSE answer for following a turn; 204 when there is no turn, or (`wait`) nothing
    after `after_seq`. `wait` holds the response head until the first events (at most a
    heartbeat interval) so that, with `error_status`, an error before anything was streamed
    (bad upstream key, rate limit after retries, busy session) is answered with its HTTP
    status and a JSON body: clients branch on it like on any other request."""
    if turn_id is None:
        return Response(status_code=204)
    forward = Forward(engine, session_id, turn_id, framing, after_seq, cancel_on_disconnect)
    first = None
    if wait:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + engine.settings.heartbeat_seconds
        try:  # (the first events, or after `deadline` a heartbeat tick)
            first = await anext(forward.events)
            while not first and loop.time() < deadline:
                first = await anext(forward.events)
        except StopAsyncIteration:
            return Response(status_code=204)  # nothing after that id: the client is up to date
        if error_status and first and first[0].type == "error":
            await forward.events.aclose()
            return error_event_response(json.loads(first[0].data), session_id, turn_id)
    headers = [*headers, (b"x-session-id", session_id.encode()), (b"x-turn-id", turn_id.encode())]
    return EventStream(forward, first, headers)


class EventStream:
    """A `text/event-stream` response of a turn, without StreamingResponse's anyio task group
    or a body generator in between: one framing and one send per batch (the terminal batch
    also ends the body). The body is written by a pump task of its own; one small task waits
    for the client's disconnect and cancels the pump (uvicorn silently drops writes to a
    closed connection, so without it a stream would run on to its end for nobody)."""

    send: Send  # the body's writer, once the response has started

    def __init__(self, forward: Forward, first: list[Event] | None, headers: list[tuple[bytes, bytes]]):
        self.forward = forward
        self.first = first
        self.headers = headers  # (raw ASGI headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        # The body is pumped by its own task: waking it for each batch then resumes a short
        # stack instead of this request's (server, middleware, routing), and its writes skip
        # the middleware that only look at the start.
        self.send = body_send(scope, send)
        pump = asyncio.create_task(self._pump())
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, pump))
        try:
            await pump  # (cancelling this request cancels the pump, which ends before we resume)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this request was cancelled
            # only the pump was: the client left, and the response is simply over
        finally:
            watcher.cancel()

    async def _pump(self) -> None:
        try:
            await self.forward.run(self, self.first)
        finally:
            await self.forward.abandon()

    async def heartbeat(self) -> None:
        await self.send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})

    async def write(self, batch: list[Event], framing: Framing[bytes]) -> bool:
        if batch[-1].terminal:
            body = framing.frames(batch) + framing.closing()
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
            return True
        await self.send({"type": "http.response.body", "body": framing.frames(batch), "more_body": True})
        return False

    async def end(self, framing: Framing[bytes]) -> None:
        await self.send({"type": "http.response.body", "body": framing.closing(), "more_body": False})


async def _cancel_on_disconnect(receive: Receive, pump: asyncio.Task[None]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    pump.cancel()  # the client left: the response is simply over


# -- WebSocket -----------------------------------------------------------------------------
class FramedSocket:
    """One WebSocket connection: the receive loop, one send at a time, a frame's failure
    answered without ending the connection, and the turns it follows (forwards by key, each
    a task sending a text message a frame; a new one under a key replaces the old one). The
    close abandons them (`cancel_on_disconnect`); a subclass answers `handle(text)` and
    `binary_frame()`."""

    log: logging.Logger
    where = "WebSocket"  # (names the frames in the log line of an unexpected failure)
    max_forwards = 1

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
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is None:
                    await self.binary_frame()
                    continue
                await self.handle(message["text"])
        except WebSocketDisconnect:
            pass
        finally:
            for forward in list(self.forwards.values()):
                if forward.running():
                    forward.task.cancel()
                    await forward.abandon()
            self.forwards.clear()

    async def answering(self, handling: Awaitable[None], error_frame: Callable[[ApiError], str]) -> None:
        """Await the handling of one client frame. A bad frame is answered with the
        `error_frame` of its error (a stable code); an unexpected failure is logged once and
        answered `internal`: never the end of the socket."""
        try:
            await handling
        except ApiError as exc:
            await self.send(error_frame(exc))
        except WebSocketDisconnect:
            raise  # the client left: the receive loop ends
        except Exception as exc:  # noqa: BLE001 — one bad frame must never end the connection
            if isinstance(exc, (RuntimeError, OSError)) and self.ws.application_state != WebSocketState.CONNECTED:
                return  # a send merely raced the socket closing
            error = internal_error(exc)
            if error.code == "internal":
                self.log.exception(f"unexpected error handling a {self.where} frame", exc_info=exc)
            try:
                await self.send(error_frame(error))
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass  # the socket went away meanwhile; the receive loop sees the disconnect

    def make_room(self, key: Any) -> None:
        """Before a turn is started or looked up for `key`: stop the forward it replaces, and
        refuse when the connection follows as many turns as it may."""
        self.stop(key)
        if len(self.forwards) >= self.max_forwards:
            raise ApiError("overloaded", "Too many concurrent requests on this connection.")

    def follow(self, key: Any, forward: Forward, opening: str | None = None) -> None:
        """Send `opening`, then follow the turn."""
        self.stop(key)
        forward.task = asyncio.create_task(self._pump(forward, opening))
        self.forwards[key] = forward
        forward.task.add_done_callback(lambda _: self._done(key, forward))

    def _done(self, key: Any, forward: Forward) -> None:
        if self.forwards.get(key) is forward:
            del self.forwards[key]

    def stop(self, key: Any) -> Forward | None:
        """Stop following under `key` (the turn goes on); the forward that was stopped."""
        forward = self.forwards.pop(key, None)
        if forward is not None and forward.task is not None:
            forward.task.cancel()
        return forward

    async def _pump(self, forward: Forward, opening: str | None) -> None:
        try:
            if opening is not None:
                await self.send(opening)
            await forward.run(self)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the socket went away; the turn goes on and can be resumed

    async def heartbeat(self) -> None:
        pass  # the connection's pings keep it alive

    async def write(self, batch: list[Event], framing: Framing[Iterable[str]]) -> bool:
        for text in framing.frames(batch):
            await self.send(text)
        return False

    async def end(self, framing: Framing[Iterable[str]]) -> None:
        for text in framing.closing():
            await self.send(text)

