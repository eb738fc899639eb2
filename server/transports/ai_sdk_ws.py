"""`WS /api/chat/ws`: the protocol of the `ai` package's `WebSocketChatTransport`, so `useChat`
works over one persistent WebSocket with no custom client code.

Client frames (JSON text), chats multiplexed by `requestId`: `send` (`id`: the chat, `trigger`,
`messageId`?, `messages`, `body`), `resume` (`id`, `lastSequence`?), `abort`. Server frames:
`start` (accepted), `chunk` (`sequence` from 0, a UI message `chunk` of ai_sdk.UIChunks), `end`
(after `finish`), `error` (`errorText`: failed before streaming), `no-active` (nothing to resume);
the client treats any other type as fatal, so keep-alive is the server's WebSocket-level ping.

A send whose last message is the assistant's answers its paused tool calls (approvals, client
tool outputs) and streams the same turn from that pause on (ai_sdk.py); a stream that reaches a
pause ends there (`end`) while the turn waits for the answer. A `regenerate-message` send, or a
`submit-message` with `messageId` (an edit), rewinds the chat's session first, as on /api/chat.

A resume replays the turn's chunks and skips sequences up to `lastSequence`. `abort` of a send
cancels the turn (the partial answer is kept), of a resume only stops following. A dropped socket
leaves turns running (unless `cancel_on_disconnect`). Authenticate as on /agent/ws: a
`bearer.<key>` subprotocol next to `agent` (`protocols`), a ticket query parameter or a header.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import Any, Collection, Iterable, Iterator

from starlette.websockets import WebSocket

from .. import tracing
from ..errors import ApiError
from ..events import Event, dumps
from ..requests import parse_json_body, valid_text
from ..security import admit_turn
from .ai_sdk import (UIChunks, answer_paused_tools, chat_turn, chat_turn_request, continued_message, session_for_chat,
                     start_chat_turn)
from .forward import FramedSocket

log = logging.getLogger("server.ai_sdk_ws")

MAX_ACTIVE_REQUESTS = 32
MAX_REQUEST_ID_CHARS = 200


class ChunkFrames(UIChunks):
    """The framing of /api/chat/ws: `chunk` frames numbered from 0 (the client has those up to
    `last_sequence`), `start` first and `end` last."""

    def __init__(self, request_id: str, turn_id: str, last_sequence: int, answered: Collection[str] = ()):
        super().__init__(turn_id, answered)
        rid = dumps(request_id)
        self.opening = '{"type":"start","requestId":' + rid + "}"
        self.end = '{"type":"end","requestId":' + rid + "}"
        self.prefix = '{"type":"chunk","requestId":' + rid + ',"sequence":'
        self.sequence = -1
        self.last_sequence = last_sequence

    def frames(self, batch: list[Event]) -> Iterator[str]:
        return self._numbered(c for e in batch for c in self.feed(e))

    def closing(self) -> Iterator[str]:
        yield from self._numbered(self.ending())
        yield self.end

    def pause_closing(self) -> Iterator[str]:
        yield from self._numbered(self.pause_ending())
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

    async def binary_frame(self) -> None:  # a binary frame has no requestId to answer
        log.info("dropped a binary WebSocket chat frame")

    async def handle(self, raw: str) -> None:
        frame: Any = {}  # (if not a JSON object, or nested too deep to read: no requestId to answer)
        with suppress(ApiError):
            frame = parse_json_body(raw)
        request_id = frame.get("requestId")
        if (not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_CHARS
                or not valid_text(request_id)):
            log.info("dropped a WebSocket chat frame without a usable requestId")
            return  # nothing to answer to: the client could not correlate it
        await self.answering(self._dispatch(request_id, frame),
                             lambda exc: dumps({"type": "error", "requestId": request_id, "errorText": exc.message}))

    async def _dispatch(self, request_id: str, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind not in ("send", "resume", "abort"):
            raise ApiError("invalid_request", "Frame `type` must be one of: send, resume, abort.")
        if tracing.enabled:
            tracing.annotate("agent.ws.frame_type", kind)
        await getattr(self, "_" + kind)(request_id, frame)

    def _make_room(self, request_id: str) -> None:
        """Before a turn is started or looked up: stop the stream it replaces; refuse one too many."""
        self.stop(request_id)  # (a reused requestId replaces its stream)
        if len(self.forwards) >= MAX_ACTIVE_REQUESTS:
            raise ApiError("overloaded", "Too many concurrent requests on this connection.")

    async def write(self, batch: list[Event], framing: ChunkFrames) -> bool:
        """A batch's frames; at a pause (the turn waits for the client's answer) the request's end."""
        for text in framing.frames(batch):
            await self.send(text)
        if framing.paused_seq != batch[-1].seq:
            return False
        for text in framing.pause_closing():
            await self.send(text)
        return True

    async def _send(self, request_id: str, frame: dict[str, Any]) -> None:
        await admit_turn(self.ws)  # per-minute limits, as for POST /api/chat
        self._make_room(request_id)
        body = frame.get("body")
        if (message := continued_message(frame)) is not None:  # answers to the turn's paused tool calls
            session_id, turn_id, answered = await answer_paused_tools(self.engine, frame, message, self.principal)
            self.follow(request_id, session_id, turn_id, ChunkFrames(request_id, turn_id, -1, answered), 0,
                        isinstance(body, dict) and body.get("cancel_on_disconnect") is True, True)
            return
        req = chat_turn_request(frame, body if isinstance(body, dict) else {}, self.principal, self.engine.settings)
        handle = await start_chat_turn(self.engine, req, self.principal)
        self.follow(request_id, handle.session_id, handle.turn_id, ChunkFrames(request_id, handle.turn_id, -1), 0,
                    req.cancel_on_disconnect, True)

    async def _resume(self, request_id: str, frame: dict[str, Any]) -> None:
        self._make_room(request_id)
        session_id = session_for_chat(frame.get("id"), self.principal)
        last = frame.get("lastSequence")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ApiError("invalid_request", "`lastSequence` must be a non-negative integer.")
        turn_id, _running = await chat_turn(self.engine, session_id, self.principal)
        if turn_id is None:  # idle, or the last turn's log has expired
            await self.send(dumps({"type": "no-active", "requestId": request_id}))
            return
        if tracing.enabled:
            await self.engine.link_turn(session_id, turn_id)
        self.follow(request_id, session_id, turn_id, ChunkFrames(request_id, turn_id, -1 if last is None else last))

    async def _abort(self, request_id: str, _frame: dict[str, Any]) -> None:
        forward = self.stop(request_id)
        if forward is not None and forward.started:
            await self.engine.cancel_turn(forward.session_id, forward.turn_id)


async def chat_ws(ws: WebSocket) -> None:
    socket = ChatSocket(ws, ws.app.state.engine)
    await ws.accept()  # the subprotocol answer (`agent`) is the security middleware's
    await socket.receive_frames()
