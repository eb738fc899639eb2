"""One task per worker that does every running turn's periodic work, in batches.

Per-turn background tasks (a log writer, a lock renewer, a heartbeat timer per follower)
would cost a wakeup and a Redis round trip each. Instead, every `EVENT_LOG_FLUSH_MS` this task
writes the events every turn emitted since the last pass (one log entry per turn) and renews
the session locks that are due (every TTL/3), all in ONE pipelined round trip, and wakes the
followers of turns quiet for `HEARTBEAT_SECONDS` so transports can send a keep-alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .store.base import LogBatch, Store

if TYPE_CHECKING:
    from .turns import Turn

log = logging.getLogger("server.housekeeping")

FAILURE_LOG_EVERY = 30.0


class Housekeeper:
    def __init__(self, store: Store, *, flush_interval: float, lock_ttl: float, heartbeat: float):
        self.store = store
        self.flush_interval = flush_interval
        self.renew_every = max(lock_ttl / 3, 0.05)
        self.heartbeat = heartbeat
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

    def add(self, turn: Turn) -> None:
        self.turns[turn] = time.monotonic() + self.renew_every

    def mark(self, turn: Turn) -> None:
        """The turn has new events to write (called per event: a set insert)."""
        self.dirty.add(turn)
        if not self.flush_interval:
            self._dirty_signal.set()

    async def release(self, turn: Turn) -> list:
        """Forget the turn; return its events not yet written (they go with its commit).
        Waits for a write in flight that carries its events, so the log keeps its order."""
        self.turns.pop(turn, None)
        self.dirty.discard(turn)
        while turn in self._inflight_turns and self._inflight is not None:
            await asyncio.shield(self._inflight)
        self.logged.discard(turn)
        return turn.take_pending()

    def _failed(self, exc: Exception) -> None:
        """A failed write is retried every pass: say so once per outage (and every
        FAILURE_LOG_EVERY seconds while it lasts), not once per pass."""
        now = time.monotonic()
        if not self._failures or now - self._failure_logged_at >= FAILURE_LOG_EVERY:
            self._failure_logged_at = now
            log.warning("event log writes failing (%s: %s; %d passes so far); retrying every pass",
                        type(exc).__name__, str(exc)[:200], self._failures + 1)
        self._failures += 1

    async def _run(self) -> None:
        while True:
            if self.flush_interval:
                await asyncio.sleep(self.flush_interval)
            else:
                try:
                    await asyncio.wait_for(self._dirty_signal.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass
                self._dirty_signal.clear()
            try:
                await self._pass(time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad pass stop the worker's turns
                log.exception("housekeeping pass failed")

    async def _pass(self, now: float) -> None:
        for turn in self.turns:
            if now - turn.last_activity >= self.heartbeat:
                turn.tick(now)
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
            self._failed(exc)
            for turn, batch in zip(writing, batches):
                turn.requeue(batch.events)
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
