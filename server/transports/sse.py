"""Server-Sent Events: `POST /agent/stream` and the resume endpoint `GET /sessions/{id}/stream`.

An error before anything was streamed is answered with its HTTP status and a JSON body; once
the stream has started, errors arrive as `error` events (forward.py).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from .. import tracing
from ..security import principal_of
from ..engine import valid_session_id
from ..events import resume_after, sse_frame
from ..requests import parse_json_body, parse_turn_request
from .forward import Framing, open_stream
from .http_api import engine_of

# The response head as ASGI wants it; a stream adds its session and turn ids.
_RAW_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"), (b"connection", b"keep-alive")]
# The framing of /agent's SSE: each event as `id:` and `data:` (events.sse_frame), nothing after.
EventFrames = Framing(frames=lambda batch: b"".join(map(sse_frame, batch)), closing=bytes)


async def agent_stream(request: Request) -> Response:
    engine = engine_of(request)
    req = parse_turn_request(parse_json_body(await request.body()), engine.settings)
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
    if tracing.enabled and turn_id is not None:
        await engine.link_turn(session_id, turn_id)
    return await open_stream(engine, session_id, turn_id, EventFrames, _RAW_HEADERS,
                             after_seq=resume_after(last_event_id, turn_id))
