"""`WS /api/chat/ws`: the protocol of the `ai` package's `WebSocketChatTransport`, so `useChat`
works over one persistent WebSocket with no custom client code.

Client frames (JSON text), any number of chats multiplexed by `requestId`:
    {"type":"send","requestId","id":chatId,"trigger","messageId"?,"messages":UIMessage[],"headers","body","metadata"?}
    {"type":"resume","requestId","id":chatId,"lastSequence"?:n,"headers","body"}
    {"type":"abort","requestId"}
Server frames:
    {"type":"start","requestId"}                       the request was accepted
    {"type":"chunk","requestId","sequence":n,"chunk"}  UI message chunks (ai_sdk.UIChunks), n from 0
    {"type":"end","requestId"}                         after the `finish` chunk
    {"type":"error","requestId","errorText"}           the request failed before streaming
    {"type":"no-active","requestId"}                   nothing to resume

A chunk's sequence is its position in the turn's chunk stream, so a resume replays the turn
from its start and skips sequences up to `lastSequence`. `abort` of a send cancels the turn
(the partial answer is kept); `abort` of a resume only stops following. A dropped socket
leaves turns running (unless sent with `cancel_on_disconnect`); reconnect and resume. The
client treats unknown frame types as fatal, so nothing else is ever sent (keep-alive is
the WebSocket-level ping of the server). Authenticate as on /agent/ws: a `bearer.<key>`
subprotocol next to `agent` (`protocols`), a ticket query parameter (`params`) or a header.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any, Iterable, Iterator

from starlette.websockets import WebSocket

from ..errors import ApiError
from ..events import Event
from ..requests import parse_json_body, valid_text
from ..security import admit_turn
from .ai_sdk import UIChunks, chat_turn, chat_turn_request, session_for_chat
from .forward import Forward, FramedSocket

log = logging.getLogger("server.ai_sdk_ws")

MAX_ACTIVE_REQUESTS = 32
MAX_REQUEST_ID_CHARS = 200

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ChunkFrames(UIChunks):
    """The framing of /api/chat/ws: each chunk as a `chunk` frame numbered from 0, those up
    to `last_sequence` left out (the client has them); an `end` frame last."""

    def __init__(self, request_id: str, turn_id: str, last_sequence: int):
        super().__init__(turn_id)
        rid = _dumps(request_id)
        self.start = '{"type":"start","requestId":' + rid + "}"
        self.end = '{"type":"end","requestId":' + rid + "}"
        self.prefix = '{"type":"chunk","requestId":' + rid + ',"sequence":'
        self.sequence = -1
        self.last_sequence = last_sequence

    def frames(self, batch: list[Event]) -> Iterator[str]:
        return self._numbered(c for e in batch for c in self.feed(e))

    def closing(self) -> Iterator[str]:
        yield from self._numbered(self.ending())
        yield self.end

    def _numbered(self, chunks: Iterable[str]) -> Iterator[str]:
        sequence, last, prefix = self.sequence, self.last_sequence, self.prefix
        for chunk in chunks:
            sequence += 1
            if sequence > last:
                yield prefix + str(sequence) + ',"chunk":' + chunk + "}"
        self.sequence = sequence


class ChatSocket(FramedSocket):
    log = log
    where = "WebSocket chat"
    max_forwards = MAX_ACTIVE_REQUESTS

    async def binary_frame(self) -> None:  # a binary frame has no requestId to answer
        log.info("dropped a binary WebSocket chat frame")

    async def handle(self, raw: str) -> None:
        try:
            frame: Any = parse_json_body(raw)
        except ApiError:
            frame = None  # not a JSON object (or nested too deep to read): no requestId to answer
        request_id = frame.get("requestId") if frame is not None else None
        if (not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_CHARS
                or not valid_text(request_id)):
            log.info("dropped a WebSocket chat frame without a usable requestId")
            return  # nothing to answer to: the client could not correlate it
        await self.answering(self._dispatch(request_id, frame), partial(_error_frame, request_id))

    async def _dispatch(self, request_id: str, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "abort":
            await self._abort(request_id)
        elif kind == "send":
            await admit_turn(self.ws)  # per-minute limits, as for POST /api/chat
            await self._send(request_id, frame)
        elif kind == "resume":
            await self._resume(request_id, frame)
        else:
            raise ApiError("invalid_request", "Frame `type` must be one of: send, resume, abort.")

    async def _send(self, request_id: str, frame: dict[str, Any]) -> None:
        self.make_room(request_id)  # a reused requestId replaces its stream
        body = frame.get("body")
        req = chat_turn_request(frame.get("id"), frame.get("trigger"), frame.get("messages"),
                                frame.get("messageId"), body if isinstance(body, dict) else {},
                                self.principal, self.engine.settings)
        handle = await self.engine.start(req, self.principal)
        self._forward(request_id, handle.session_id, handle.turn_id, -1, req.cancel_on_disconnect, True)

    async def _resume(self, request_id: str, frame: dict[str, Any]) -> None:
        self.make_room(request_id)
        session_id = session_for_chat(frame.get("id"), self.principal)
        last = frame.get("lastSequence")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ApiError("invalid_request", "`lastSequence` must be a non-negative integer.")
        turn_id, _running = await chat_turn(self.engine, session_id, self.principal)
        if turn_id is None:  # idle, or the last turn's log has expired
            await self.send(_dumps({"type": "no-active", "requestId": request_id}))
            return
        self._forward(request_id, session_id, turn_id, -1 if last is None else last)

    def _forward(self, request_id: str, session_id: str, turn_id: str, last_sequence: int,
                 cancel_on_disconnect: bool = False, started: bool = False) -> None:
        framing = ChunkFrames(request_id, turn_id, last_sequence)
        forward = Forward(self.engine, session_id, turn_id, framing, 0, cancel_on_disconnect, started)
        self.follow(request_id, forward, framing.start)

    async def _abort(self, request_id: str) -> None:
        forward = self.stop(request_id)
        if forward is not None and forward.started:
            await self.engine.cancel_turn(forward.turn_id)


def _error_frame(request_id: str, exc: ApiError) -> str:
    return _dumps({"type": "error", "requestId": request_id, "errorText": exc.message})


async def chat_ws(ws: WebSocket) -> None:
    socket = ChatSocket(ws, ws.app.state.engine)
    await ws.accept()  # the subprotocol answer (`agent`) is the security middleware's
    await socket.receive_frames()
