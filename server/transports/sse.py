"""Server-Sent Events: `POST /agent/stream` and the resume endpoint `GET /sessions/{id}/stream`.

An error that happens before anything was streamed is answered with its HTTP status and a
JSON body; once the stream has started, errors arrive as `error` events. Several events
that are ready together go out in one write (forward.py).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ..security import principal_of
from ..engine import valid_session_id
from ..events import Event, resume_after, sse_frame
from .forward import open_stream
from .http_api import engine_of, read_turn_request

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
# The response head as ASGI wants it, encoded once; a stream adds its session and turn ids.
_RAW_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                *[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SSE_HEADERS.items()]]


class EventFrames:
    """The framing of /agent's SSE: each event as `id:` and `data:` (events.sse_frame)."""

    @staticmethod
    def frames(batch: list[Event]) -> bytes:
        return b"".join(map(sse_frame, batch))

    @staticmethod
    def closing() -> bytes:
        return b""


async def agent_stream(request: Request) -> Response:
    engine = engine_of(request)
    req = await read_turn_request(request)
    handle = await engine.start(req, principal_of(request))
    return await open_stream(engine, handle.session_id, handle.turn_id, EventFrames, _RAW_HEADERS,
                             error_status=True, cancel_on_disconnect=req.cancel_on_disconnect)


async def resume_stream(request: Request) -> Response:
    """Replay a turn after `Last-Event-ID` (header or `last_event_id` query parameter), then
    follow it live; the latest turn from its start when the id names no turn of this session."""
    engine = engine_of(request)
    session_id = valid_session_id(request.path_params["session_id"])
    turn_id, _running = await engine.resumable_turn(session_id, principal_of(request))
    last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    return await open_stream(engine, session_id, turn_id, EventFrames, _RAW_HEADERS,
                             after_seq=resume_after(last_event_id, turn_id))
