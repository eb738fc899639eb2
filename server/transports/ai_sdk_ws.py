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

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..auth import principal_of
from ..engine import Engine
from ..errors import ApiError
from ..requests import parse_json_body, valid_text
from ..security import admit_turn
from .ai_sdk import UIChunks, chat_turn_request, session_for_chat
from .errors import frame_failure

log = logging.getLogger("server.ai_sdk_ws")

MAX_ACTIVE_REQUESTS = 32
MAX_REQUEST_ID_CHARS = 200

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(slots=True)
class _Active:
    kind: str  # "send" | "resume"
    task: asyncio.Task[None]
    turn_id: str | None = None
    cancel_on_disconnect: bool = False


class ChatSocket:
    def __init__(self, ws: WebSocket, engine: Engine):
        self.ws = ws
        self.engine = engine
        self.principal = principal_of(ws)
        self.active: dict[str, _Active] = {}
        self._send_lock = asyncio.Lock()

    async def run(self) -> None:
        await self.ws.accept()  # the subprotocol answer (`agent`) is the security middleware's
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is None:  # a binary frame has no requestId to answer
                    log.info("dropped a binary WebSocket chat frame")
                    continue
                await self._handle(message["text"])
        except WebSocketDisconnect:
            pass
        finally:
            for request in list(self.active.values()):
                request.task.cancel()
                if request.cancel_on_disconnect and request.turn_id:
                    await self.engine.cancel_turn(request.turn_id)
            self.active.clear()

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)

    async def _handle(self, raw: str) -> None:
        try:
            frame: Any = parse_json_body(raw)
        except ApiError:
            frame = None  # not a JSON object (or nested too deep to read): no requestId to answer
        request_id = frame.get("requestId") if frame is not None else None
        if (not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_CHARS
                or not valid_text(request_id)):
            log.info("dropped a WebSocket chat frame without a usable requestId")
            return  # nothing to answer to: the client could not correlate it
        kind = frame.get("type")
        try:
            if kind == "abort":
                await self._abort(request_id)
            elif kind == "send":
                await admit_turn(self.ws)  # per-minute limits, as for POST /api/chat
                await self._send(request_id, frame)
            elif kind == "resume":
                await self._resume(request_id, frame)
            else:
                raise ApiError("invalid_request", "Frame `type` must be one of: send, resume, abort.")
        except ApiError as exc:
            await self.send(_dumps({"type": "error", "requestId": request_id, "errorText": exc.message}))
        except WebSocketDisconnect:
            raise  # the client left: the receive loop ends
        except Exception as exc:  # noqa: BLE001 — one bad frame must never end the connection
            error = frame_failure(exc, self.ws.application_state == WebSocketState.CONNECTED, "WebSocket chat",
                                  log)
            if error is None:
                return
            try:
                await self.send(_dumps({"type": "error", "requestId": request_id, "errorText": error.message}))
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass  # the socket went away meanwhile; the receive loop sees the disconnect

    def _check_capacity(self, request_id: str) -> None:
        old = self.active.pop(request_id, None)
        if old is not None:  # a reused requestId replaces its stream
            old.task.cancel()
        if len(self.active) >= MAX_ACTIVE_REQUESTS:
            raise ApiError("overloaded", "Too many concurrent requests on this connection.")

    async def _send(self, request_id: str, frame: dict[str, Any]) -> None:
        self._check_capacity(request_id)
        body = frame.get("body")
        req = chat_turn_request(frame.get("id"), frame.get("trigger"), frame.get("messages"),
                                frame.get("messageId"), body if isinstance(body, dict) else {},
                                self.principal, self.engine.settings)
        handle = await self.engine.start(req, self.principal)
        self._forward(request_id, "send", handle.session_id, handle.turn_id, -1, req.cancel_on_disconnect)

    async def _resume(self, request_id: str, frame: dict[str, Any]) -> None:
        self._check_capacity(request_id)
        session_id = session_for_chat(frame.get("id"), self.principal)
        last = frame.get("lastSequence")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ApiError("invalid_request", "`lastSequence` must be a non-negative integer.")
        try:
            turn_id, _running = await self.engine.resumable_turn(session_id, self.principal)
        except ApiError as exc:
            if exc.code != "session_not_found":
                raise
            turn_id = None
        if turn_id is None:  # idle, or the last turn's log has expired
            await self.send(_dumps({"type": "no-active", "requestId": request_id}))
            return
        self._forward(request_id, "resume", session_id, turn_id, -1 if last is None else last, False)

    async def _abort(self, request_id: str) -> None:
        request = self.active.pop(request_id, None)
        if request is None:
            return
        request.task.cancel()
        if request.kind == "send" and request.turn_id:
            await self.engine.cancel_turn(request.turn_id)

    def _forward(self, request_id: str, kind: str, session_id: str, turn_id: str, last_sequence: int,
                 cancel_on_disconnect: bool) -> None:
        task = asyncio.create_task(self._pump(request_id, session_id, turn_id, last_sequence))
        self.active[request_id] = _Active(kind, task, turn_id, cancel_on_disconnect)
        task.add_done_callback(lambda t: self._done(request_id, t))

    def _done(self, request_id: str, task: asyncio.Task[None]) -> None:
        request = self.active.get(request_id)
        if request is not None and request.task is task:
            del self.active[request_id]

    async def _pump(self, request_id: str, session_id: str, turn_id: str, last_sequence: int) -> None:
        rid = _dumps(request_id)
        prefix = '{"type":"chunk","requestId":' + rid + ',"sequence":'
        chunks = UIChunks(turn_id)
        sequence = -1
        events = self.engine.follow(session_id, turn_id, 0)
        try:
            await self.send('{"type":"start","requestId":' + rid + "}")
            async for batch in events:
                for event in batch:
                    for chunk in chunks.feed(event):
                        sequence += 1
                        if sequence > last_sequence:
                            await self.send(prefix + str(sequence) + ',"chunk":' + chunk + "}")
            if not chunks.done:  # the follow ended early: this worker is stopping
                for chunk in chunks.interrupted(ApiError("server_restarting").message):
                    sequence += 1
                    if sequence > last_sequence:
                        await self.send(prefix + str(sequence) + ',"chunk":' + chunk + "}")
            await self.send('{"type":"end","requestId":' + rid + "}")
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the socket went away; the turn goes on and can be resumed
        finally:
            await events.aclose()


async def chat_ws(ws: WebSocket) -> None:
    await ChatSocket(ws, ws.app.state.engine).run()
