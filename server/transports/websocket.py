"""`WS /agent/ws`: many turns per connection, the same event vocabulary as SSE.

Client frames (JSON text): `message` (the POST /agent body fields), `cancel` (the session's
running turn), `resume` (`session_id`?, `last_event_id`?), `tool_approval` (`tool_use_id`,
`approved`, `reason`?) and `tool_result` (`tool_use_id`, `output`, `is_error`?) for a tool call the
session's turn waits for, `ping`. Server frames: the turn events,
`ping` heartbeats, `pong`, `error` for a bad frame (the connection stays usable). A connection is
bound to one session: `?session_id=` at connect, else the first message's. Turns outlive the socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import suppress
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from .. import tracing
from ..engine import Engine, valid_session_id
from ..errors import ApiError
from ..events import resume_after
from ..requests import parse_json_body, parse_turn_request
from ..security import admit_turn
from .forward import SOCKET_GONE, FramedSocket, Framing

log = logging.getLogger("server.ws")

PING = '{"type":"ping"}'
PONG = '{"type":"pong"}'
# The framing of /agent/ws: each event's JSON as one text frame, nothing before or after.
EventTexts = Framing(opening=None, frames=lambda batch: (e.data.decode() for e in batch), closing=tuple)


class AgentSocket(FramedSocket):
    """One client connection: reads frames, follows at most one turn at a time."""

    log = log

    def __init__(self, ws: WebSocket, engine: Engine):
        super().__init__(ws, engine)
        self.session_id: str | None = None
        self.cancel_on_disconnect = False  # (the one of the connection's last message)
        self.last_send = 0.0
        self._clock = asyncio.get_running_loop().time

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)
        self.last_send = self._clock()

    async def run(self, pinger: Pinger) -> None:
        session_id = self.ws.query_params.get("session_id")
        if session_id is not None:
            try:
                await self.engine.resumable_turn(valid_session_id(session_id), self.principal)
            except ApiError as exc:
                await self.ws.close(code=1008, reason="invalid_session_id" if exc.code == "invalid_session_id"
                                    else "session_not_found")
                return
            self.session_id = session_id
        await self.ws.accept()
        pinger.add(self)
        try:
            await self.receive_frames()
        finally:
            pinger.sockets.discard(self)

    async def binary_frame(self) -> None:  # answer, don't crash the handler
        await self.send(_error_frame(ApiError("invalid_request", "Frames must be JSON text.")))

    async def handle(self, raw: str) -> None:
        await self.answering(self._dispatch(raw), _error_frame)

    async def _dispatch(self, raw: str) -> None:
        frame = parse_json_body(raw)
        kind = frame.get("type")
        if tracing.enabled and isinstance(kind, str):
            tracing.annotate("agent.ws.frame_type", kind[:64])
        if kind in ("message", "cancel", "resume"):
            await getattr(self, "_" + kind)(frame)
        elif kind in ("tool_approval", "tool_result"):
            if self.session_id is None:
                raise ApiError("invalid_request", "No session on this connection yet.")
            answer = {k: v for k, v in frame.items() if k != "type"}
            await self.engine.answer_tools(self.session_id, self.principal, [answer])
        elif kind == "ping":
            await self.send(PONG)
        elif kind != "pong":
            raise ApiError("invalid_request", "Frame `type` must be one of: message, cancel, resume, "
                           "tool_approval, tool_result, ping.")

    async def _message(self, frame: dict[str, Any]) -> None:
        await admit_turn(self.ws)  # per-minute limits, as for POST /agent
        body = {k: v for k, v in frame.items() if k != "type"}
        if body.setdefault("session_id", self.session_id) is None:
            del body["session_id"]
        req = parse_turn_request(body, self.engine.settings)
        if self.session_id is not None and req.session_id not in (None, self.session_id):
            raise ApiError("invalid_request", "This connection is bound to another session.", field="session_id")
        busy = self.forwards.get(None)
        if busy is not None and req.on_busy != "interrupt":
            raise ApiError("session_busy", turn_id=busy.turn_id)
        handle = await self.engine.start(req, self.principal)
        self.session_id = handle.session_id
        self.cancel_on_disconnect = req.cancel_on_disconnect
        self.follow(None, handle.session_id, handle.turn_id, EventTexts, 0, req.cancel_on_disconnect)

    async def _cancel(self, _frame: dict[str, Any]) -> None:
        if self.session_id is None:
            raise ApiError("invalid_request", "No session on this connection yet.")
        if await self.engine.cancel(self.session_id, self.principal) is None:
            await self.send(json.dumps({"type": "cancel_result", "cancelled_turn_id": None}))

    async def _resume(self, frame: dict[str, Any]) -> None:
        last_event_id = frame.get("last_event_id")
        if last_event_id is not None and not isinstance(last_event_id, str):
            raise ApiError("invalid_request", "`last_event_id` must be a string `<turn_id>:<seq>`.",
                           field="last_event_id")
        session_id = valid_session_id(frame.get("session_id", self.session_id))
        if self.session_id is not None and session_id != self.session_id:
            raise ApiError("invalid_request", "This connection is bound to another session.")
        turn_id, _running = await self.engine.resumable_turn(session_id, self.principal)
        self.session_id = session_id
        if turn_id is None:
            await self.send(json.dumps({"type": "no_active_turn", "session_id": session_id}))
            return
        if tracing.enabled:
            await self.engine.link_turn(session_id, turn_id)
        self.follow(None, session_id, turn_id, EventTexts, resume_after(last_event_id, turn_id),
                    self.cancel_on_disconnect)

    async def ping(self) -> None:
        if self.ws.client_state == WebSocketState.CONNECTED:
            with suppress(*SOCKET_GONE):
                await self.send(PING)


def _error_frame(exc: ApiError) -> str:
    return json.dumps({"type": "error", **exc.payload()})


class Pinger:
    """One task per worker pings every quiet socket (a sleeping task per connection costs memory)."""

    def __init__(self, interval: float):
        self.interval = interval
        self.sockets: set[AgentSocket] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, socket: AgentSocket) -> None:
        self.sockets.add(socket)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="ws-pinger")

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
    await AgentSocket(ws, state.engine).run(pinger)
