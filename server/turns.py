"""A running turn inside this worker: its events and its local followers.

Events go three ways, none of them costing a Redis round trip per token: into `events`, which
local followers on this worker read straight from memory; into `pending`, which the worker's
Housekeeper writes to the store's event log with every other turn's events in one round trip
per `EVENT_LOG_FLUSH_MS`; what is still pending when the turn ends goes out with its commit.
A turn has no task of its own: the Housekeeper also renews its lock and wakes its followers
for heartbeats, through the methods below.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, AsyncGenerator

from . import events as ev
from .events import Event

if TYPE_CHECKING:
    from .housekeeping import Housekeeper


class Turn:
    def __init__(self, housekeeper: Housekeeper, session_id: str, turn_id: str):
        self.housekeeper = housekeeper
        self.session_id = session_id
        self.turn_id = turn_id
        self.events: list[Event] = []
        self.pending: list[Event] = []
        self.done = False
        self.finishing = False
        self.cancel_reason: str | None = None  # "cancelled" | "server_restarting" | "interrupted"
        self.task: asyncio.Task[None] | None = None
        self.started_at = self.last_activity = time.monotonic()
        self._waiters: list[asyncio.Future[None]] = []  # followers waiting for news
        housekeeper.add(self)

    # -- emitting ------------------------------------------------------------------------
    def emit(self, type_: str, payload: dict) -> Event:
        return self.push(ev.encode(self.turn_id, len(self.events) + 1, type_, payload))

    def emit_text(self, text: str, text_json: str | None = None) -> Event:
        return self.push(ev.text_delta(self.turn_id, len(self.events) + 1, text, text_json))

    def push(self, event: Event) -> Event:
        self.events.append(event)
        self.pending.append(event)
        self.last_activity = time.monotonic()
        self.housekeeper.mark(self)
        self._wake()
        return event

    def terminal_event(self, type_: str, payload: dict) -> Event:
        """Build (but do not publish) the last event: it is committed with the turn."""
        return ev.encode(self.turn_id, len(self.events) + 1, type_, payload)

    # -- for the Housekeeper -------------------------------------------------------------
    def take_pending(self) -> list[Event]:
        """The events not yet written to the log; they are no longer pending."""
        events, self.pending = self.pending, []
        return events

    def requeue(self, events: list[Event]) -> None:
        """A write of `events` failed: they go first in the next one."""
        self.pending[:0] = events

    def tick(self, now: float) -> None:
        """Heartbeat from the Housekeeper: followers wake and see nothing new."""
        self.last_activity = now
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():  # (a cancelled follower's future is done)
                    waiter.set_result(None)

    # -- ending --------------------------------------------------------------------------
    async def stop_writers(self) -> list[Event]:
        """Leave the Housekeeper; return the events not yet written to the log."""
        return await self.housekeeper.release(self)

    def publish_final(self, event: Event) -> None:
        """Local followers see the terminal event once it is committed."""
        self.events.append(event)
        self.done = True
        self._wake()

    # -- following -----------------------------------------------------------------------
    async def follow(self, after_seq: int = 0) -> AsyncGenerator[list[Event], None]:
        """Batches of events after `after_seq` until the terminal one; `[]` is a heartbeat
        tick (no event for `HEARTBEAT_SECONDS`)."""
        i = max(after_seq, 0)
        loop = asyncio.get_running_loop()  # (once: each call costs a system call)
        while True:
            events = self.events
            if i < len(events):
                batch = events[i:]
                i = len(events)
                yield batch
                if batch[-1].terminal:
                    return
                continue
            if self.done:
                return
            waiter = loop.create_future()
            self._waiters.append(waiter)
            await waiter
            if i >= len(self.events) and not self.done:
                yield []
