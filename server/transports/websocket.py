"""`WS /agent/ws`: many turns per connection, the same event vocabulary as SSE.

Client frames (JSON text):
    {"type": "message", "message": ..., ...the POST /agent body fields}
    {"type": "cancel"}                                   cancel the session's running turn
    {"type": "resume", "session_id"?: str, "last_event_id"?: "<turn>:<seq>"}  the session's turn
    {"type": "ping"}                                     answered with {"type": "pong"}
Server frames: the turn events, `{"type":"ping"}` heartbeats, `{"type":"pong"}`, and
`{"type":"error", ...}` for a bad frame (the connection stays usable).

The connection is bound to one session: `?session_id=` at connect, else the session the
first message creates. A turn keeps running if the socket drops; reconnect and `resume`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Iterator

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..engine import Engine
from ..errors import ApiError
from ..events import Event, resume_after
from ..requests import parse_json_body, parse_turn_request
from ..security import admit_turn
from ..store.base import valid_id
from .forward import Forward, FramedSocket

log = logging.getLogger("server.ws")

PING = '{"type":"ping"}'
PONG = '{"type":"pong"}'


class EventTexts:
    """The framing of /agent/ws: each event's JSON as one text frame."""

    @staticmethod
    def frames(batch: list[Event]) -> Iterator[str]:
        return (event.data.decode() for event in batch)

    @staticmethod
    def closing() -> tuple[str, ...]:
        return ()


class AgentSocket(FramedSocket):
    """One client connection: reads frames, follows at most one turn at a time."""

    log = log

    def __init__(self, ws: WebSocket, engine: Engine, pinger: "Pinger"):
        super().__init__(ws, engine)
        self.pinger = pinger
        self.session_id: str | None = None
        self.cancel_on_disconnect = False  # (the one of the connection's last message)
        self.last_send = 0.0
        self._clock = asyncio.get_running_loop().time

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)
        self.last_send = self._clock()

    async def run(self) -> None:
        session_id = self.ws.query_params.get("session_id")
        if session_id is not None:
            if not valid_id(session_id):
                await self.ws.close(code=1008, reason="invalid_session_id")
                return
            try:
                await self.engine.resumable_turn(session_id, self.principal)
            except ApiError:
                await self.ws.close(code=1008, reason="session_not_found")
                return
            self.session_id = session_id
        await self.ws.accept()
        self.pinger.add(self)
        try:
            await self.receive_frames()
        finally:
            self.pinger.remove(self)

    async def binary_frame(self) -> None:  # answer, don't crash the handler
        await self.send(_error_frame(ApiError("invalid_request", "Frames must be JSON text.")))

    async def handle(self, raw: str) -> None:
        await self.answering(self._dispatch(raw), _error_frame)

    async def _dispatch(self, raw: str) -> None:
        frame = parse_json_body(raw)
        kind = frame.get("type")
        if kind == "message":
            await self._message(frame)
        elif kind == "cancel":
            await self._cancel()
        elif kind == "resume":
            await self._resume(frame)
        elif kind == "ping":
            await self.send(PONG)
        elif kind != "pong":
            raise ApiError("invalid_request", "Frame `type` must be one of: message, cancel, resume, ping.")

    async def _message(self, frame: dict[str, Any]) -> None:
        await admit_turn(self.ws)  # per-minute limits, as for POST /agent
        body = {k: v for k, v in frame.items() if k != "type"}
        body.setdefault("session_id", self.session_id)
        if body["session_id"] is None:
            del body["session_id"]
        req = parse_turn_request(body, self.engine.settings)
        if self.session_id is not None and req.session_id not in (None, self.session_id):
            raise ApiError("invalid_request", "This connection is bound to another session.",
                           field="session_id")
        busy = self.forwards.get(None)
        if busy is not None and busy.running() and req.on_busy != "interrupt":
            raise ApiError("session_busy", turn_id=busy.turn_id)
        handle = await self.engine.start(req, self.principal)
        self.session_id = handle.session_id
        self.cancel_on_disconnect = req.cancel_on_disconnect
        self._forward(handle.turn_id, 0)

    async def _cancel(self) -> None:
        if self.session_id is None:
            raise ApiError("invalid_request", "No session on this connection yet.")
        turn_id = await self.engine.cancel(self.session_id, self.principal)
        if turn_id is None:
            await self.send(json.dumps({"type": "cancel_result", "cancelled_turn_id": None}))

    async def _resume(self, frame: dict[str, Any]) -> None:
        last_event_id = frame.get("last_event_id")
        if last_event_id is not None and not isinstance(last_event_id, str):
            raise ApiError("invalid_request", "`last_event_id` must be a string `<turn_id>:<seq>`.",
                           field="last_event_id")
        session_id = frame.get("session_id", self.session_id)
        if not valid_id(session_id):
            raise ApiError("invalid_session_id")
        if self.session_id is not None and session_id != self.session_id:
            raise ApiError("invalid_request", "This connection is bound to another session.")
        turn_id, _running = await self.engine.resumable_turn(session_id, self.principal)
        self.session_id = session_id
        if turn_id is None:
            await self.send(json.dumps({"type": "no_active_turn", "session_id": session_id}))
            return
        self._forward(turn_id, resume_after(last_event_id, turn_id))

    def _forward(self, turn_id: str, after_seq: int) -> None:
        assert self.session_id is not None
        self.follow(None, Forward(self.engine, self.session_id, turn_id, EventTexts, after_seq,
                                  self.cancel_on_disconnect))

    async def ping(self) -> None:
        if self.ws.client_state != WebSocketState.CONNECTED:
            return
        try:
            await self.send(PING)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass


def _error_frame(exc: ApiError) -> str:
    return json.dumps({"type": "error", **exc.payload()})


class Pinger:
    """One task per worker sends the application-level ping to every quiet socket: a sleeping
    task per connection would cost memory on every idle WebSocket."""

    def __init__(self, interval: float):
        self.interval = interval
        self.sockets: set[AgentSocket] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, socket: AgentSocket) -> None:
        self.sockets.add(socket)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="ws-pinger")

    def remove(self, socket: AgentSocket) -> None:
        self.sockets.discard(socket)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.sockets:
            await asyncio.sleep(self.interval)
            quiet_since = loop.time() - self.interval * 0.9
            await asyncio.gather(*(s.ping() for s in list(self.sockets) if s.last_send <= quiet_since))


async def agent_ws(ws: WebSocket) -> None:
    state = ws.app.state
    pinger = getattr(state, "ws_pinger", None)
    if pinger is None:
        pinger = state.ws_pinger = Pinger(state.engine.settings.ws_ping_seconds)
    await AgentSocket(ws, state.engine, pinger).run()
