"""A running turn in this worker (its events, its local followers), and the worker's Housekeeper.

A turn's events go into `events`, which local followers read from memory, and `pending`. A turn has
no task of its own (a log writer, a lock renewer, heartbeat timers would each cost wakeups and Redis
round trips): every `EVENT_LOG_FLUSH_MS` the one Housekeeper writes every turn's pending events (one
log entry per turn) and renews the session locks due (every TTL/3) in ONE pipelined round trip, and
wakes the followers of turns quiet for `HEARTBEAT_SECONDS`. What is pending at the end goes with the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncGenerator

from . import events as ev
from .config import Settings
from .events import Event
from .store.base import LogBatch, Store

log = logging.getLogger("server.housekeeping")

FAILURE_LOG_EVERY = 30.0


class Turn:
    # (tracing on) The turn's span and its W3C traceparent (server/tracing.py); off, these class
    # defaults are all a turn has: nothing per turn or per event.
    span: Any = None
    traceparent: str | None = None
    answered: asyncio.Event | None = None  # (while it waits for tool answers) set when one may have come

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
        housekeeper.turns[self] = self.started_at + housekeeper.renew_every

    def emit(self, type_: str, payload: dict) -> Event:
        return self.push(ev.encode(self.turn_id, len(self.events) + 1, type_, payload))

    def emit_text(self, text: str, text_json: str | None = None) -> Event:
        return self.push(ev.text_delta(self.turn_id, len(self.events) + 1, text, text_json))

    def push(self, event: Event) -> Event:
        self.events.append(event)
        self.pending.append(event)
        self.last_activity = time.monotonic()
        self.housekeeper.mark(self)
        self.wake()
        return event

    def terminal_event(self, type_: str, payload: dict) -> Event:
        """Build (but do not publish) the last event: it is committed with the turn."""
        return ev.encode(self.turn_id, len(self.events) + 1, type_, payload)

    def take_pending(self) -> list[Event]:
        events, self.pending = self.pending, []
        return events

    def wake(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():  # (a cancelled follower's future is done)
                    waiter.set_result(None)

    def publish_final(self, event: Event) -> None:
        """Local followers see the terminal event once it is committed."""
        self.events.append(event)
        self.done = True
        self.wake()

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


class Housekeeper:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.flush_interval = settings.event_log_flush_ms / 1000
        self.renew_every = max(settings.turn_lock_ttl_seconds / 3, 0.05)
        self.heartbeat = settings.heartbeat_seconds
        self.turns: dict[Turn, float] = {}  # running turn -> when its lock is due for renewal
        self.dirty: set[Turn] = set()
        self.logged: set[Turn] = set()  # turns whose log has its first entry (and TTL)
        self._dirty_signal = asyncio.Event()
        self._inflight: asyncio.Future[None] | None = None
        self._inflight_turns: set[Turn] = set()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0  # passes in a row whose write failed
        self._failure_logged_at = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="housekeeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def mark(self, turn: Turn) -> None:
        """The turn has new events to write (called per event: a set insert)."""
        self.dirty.add(turn)
        if not self.flush_interval:
            self._dirty_signal.set()

    async def release(self, turn: Turn) -> list[Event]:
        """Forget the turn; return its events not yet written (they go with its commit).
        Waits for a write in flight that carries its events, so the log keeps its order."""
        self.turns.pop(turn, None)
        self.dirty.discard(turn)
        while turn in self._inflight_turns and self._inflight is not None:
            await asyncio.shield(self._inflight)
        self.logged.discard(turn)
        return turn.take_pending()

    async def _run(self) -> None:
        while True:
            if self.flush_interval:
                await asyncio.sleep(self.flush_interval)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._dirty_signal.wait(), 0.25)
                self._dirty_signal.clear()
            try:
                await self._pass(time.monotonic())
            except Exception:  # never let one bad pass stop the worker's turns
                log.exception("housekeeping pass failed")

    async def _pass(self, now: float) -> None:
        for turn in self.turns:
            if now - turn.last_activity >= self.heartbeat:  # a heartbeat: followers wake, see nothing new
                turn.last_activity = now
                turn.wake()
        writing = [t for t in self.dirty if t.pending]
        self.dirty.clear()
        renewing = [t for t, due in self.turns.items() if due <= now]
        if not writing and not renewing:
            return
        batches = [LogBatch(t.session_id, t.turn_id, t.take_pending(), first=t not in self.logged)
                   for t in writing]
        for turn in renewing:
            self.turns[turn] = now + self.renew_every
        self._inflight = asyncio.get_running_loop().create_future()
        self._inflight_turns = set(writing)
        try:
            renewed = await self.store.flush(batches, [(t.session_id, t.turn_id) for t in renewing])
        except Exception as exc:
            # Retried every pass: said once per outage (and every FAILURE_LOG_EVERY s while it lasts).
            if not self._failures or now - self._failure_logged_at >= FAILURE_LOG_EVERY:
                self._failure_logged_at = now
                log.warning("event log writes failing (%s: %s; %d passes so far); retrying every pass",
                            type(exc).__name__, str(exc)[:200], self._failures + 1)
            self._failures += 1
            for turn, batch in zip(writing, batches):
                turn.pending[:0] = batch.events  # first in the next write
                self.dirty.add(turn)
            return
        finally:
            self._inflight.set_result(None)
            self._inflight, self._inflight_turns = None, set()
        if self._failures:
            log.info("event log writes recovered after %d failed passes", self._failures)
            self._failures = 0
        self.logged.update(writing)
        for turn, ok in zip(renewing, renewed):
            if not ok and turn in self.turns:
                log.warning("turn %s lost its session lock", turn.turn_id)
