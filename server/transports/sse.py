"""Server-Sent Events: `POST /agent/stream` and the resume endpoint `GET /sessions/{id}/stream`.

An error that happens before anything was streamed (bad upstream key, rate limit after
retries, busy session) is answered with its HTTP status and a JSON body, so clients can
branch on the status like any other request. Once the stream has started, errors arrive
as `error` events. Several events that are ready together go out in one write.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncGenerator, AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..auth import principal_of
from ..engine import Engine, valid_session_id
from ..events import Event, parse_event_id, sse_frame
from ..middleware import body_send
from .http_api import engine_of, error_event_response, read_turn_request

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
# The response head as ASGI wants it, encoded once; a stream adds its session and turn ids.
_RAW_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                *[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SSE_HEADERS.items()]]
HEARTBEAT = b": keep-alive\n\n"


async def agent_stream(request: Request) -> Response:
    engine = engine_of(request)
    req = await read_turn_request(request)
    handle = await engine.start(req, principal_of(request))
    return await stream_turn(engine, handle.session_id, handle.turn_id, 0,
                             cancel_on_disconnect=req.cancel_on_disconnect)


async def resume_stream(request: Request) -> Response:
    """Replay a turn after `Last-Event-ID` (header or `last_event_id` query parameter), then
    follow it live; the latest turn from its start when the id names no turn of this session."""
    engine = engine_of(request)
    session_id = valid_session_id(request.path_params["session_id"])
    turn_id, _running = await engine.resumable_turn(session_id, principal_of(request))
    if turn_id is None:
        return Response(status_code=204)
    last = parse_event_id(request.headers.get("last-event-id") or request.query_params.get("last_event_id"))
    after = last[1] if last and last[0] == turn_id else 0
    return await stream_turn(engine, session_id, turn_id, after, replay=True)


async def stream_turn(engine: Engine, session_id: str, turn_id: str, after_seq: int, *,
                      cancel_on_disconnect: bool = False, replay: bool = False) -> Response:
    events = engine.follow(session_id, turn_id, after_seq)
    try:
        first = await _first_batch(events, engine.settings.heartbeat_seconds)
    except StopAsyncIteration:
        return Response(status_code=204)  # nothing after that id: the client is up to date
    if first and first[0].type == "error" and after_seq == 0 and not replay:
        await events.aclose()
        return error_event_response(json.loads(first[0].data), session_id, turn_id)
    headers = [*_RAW_HEADERS, (b"x-session-id", session_id.encode()), (b"x-turn-id", turn_id.encode())]
    on_abandon = (lambda: engine.cancel_turn(turn_id)) if cancel_on_disconnect else None
    return EventStream(events, first, headers, on_abandon)


class EventStream:
    """A `text/event-stream` response of a turn's event batches, without StreamingResponse's
    anyio task group or a body generator in between (one frame join and one send per batch).

    The body is written by a pump task of its own; one small task waits for the client's
    disconnect and cancels the pump (uvicorn silently drops writes to a closed connection,
    so without it a stream would run on to its end for nobody). `on_abandon` runs when the
    stream ends before the turn's terminal event (the client left, or the server stops)."""

    def __init__(self, events: AsyncGenerator[list[Event], None], first: list[Event],
                 headers: list[tuple[bytes, bytes]], on_abandon: Callable[[], Awaitable[None]] | None = None):
        self.events = events
        self.first = first
        self.on_abandon = on_abandon
        self.headers = headers  # (raw ASGI headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        # The body is pumped by its own task: waking it for each batch then resumes a
        # three-frame stack instead of this request's ~18 (server, middleware, routing),
        # and its writes skip the middleware that only look at the start.
        pump = asyncio.create_task(self._pump(body_send(scope, send)))
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

    async def _pump(self, send: Send) -> None:
        finished = False
        try:
            if self.first:
                finished = await _write(send, self.first)
            if not finished:
                async for batch in self.events:
                    if await _write(send, batch):
                        break
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
        finally:
            try:
                if not finished and self.on_abandon is not None:
                    await self.on_abandon()
            finally:
                await self.events.aclose()


async def _write(send: Send, batch: list[Event]) -> bool:
    """One write of a batch of events (an empty one is a heartbeat). A batch that ends with
    the terminal event also ends the body, in the same write; True when it did."""
    if not batch:
        await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
        return False
    last = batch[-1].terminal
    await send({"type": "http.response.body", "body": b"".join(map(sse_frame, batch)), "more_body": not last})
    return last


async def _cancel_on_disconnect(receive: Receive, pump: asyncio.Task[None]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    pump.cancel()  # the client left: the response is simply over


async def _first_batch(events: AsyncIterator[list[Event]], wait: float) -> list[Event]:
    """Wait for the first events so a pre-stream error can still become an HTTP status;
    after `wait` seconds of silence start streaming anyway (heartbeats keep it alive)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        batch = await anext(events)
        if batch or loop.time() >= deadline:
            return batch
