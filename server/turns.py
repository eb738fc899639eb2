"""A running turn inside this worker: its events, its local followers and its log writer.

Events go three ways, none of them costing a Redis round trip per token:
- into `events` (local followers on this worker read them straight from memory);
- into `pending`, which a writer task flushes to the store's event log at most once per
  `flush_interval` (one pipelined round trip per flush) so other workers can follow;
- whatever is still pending when the turn ends goes out with the fenced commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from . import events as ev
from .events import Event
from .store.base import Store

log = logging.getLogger("server.turns")


class Turn:
    def __init__(self, store: Store, session_id: str, turn_id: str, *, flush_interval: float,
                 lock_ttl: float, heartbeat: float):
        self.store = store
        self.session_id = session_id
        self.turn_id = turn_id
        self.events: list[Event] = []
        self.pending: list[Event] = []
        self.done = False
        self.finishing = False
        self.cancel_reason: str | None = None  # "cancelled" | "server_restarting" | "interrupted"
        self.task: asyncio.Task[None] | None = None
        self.started_at = time.monotonic()
        self._flush_interval = flush_interval
        self._renew_every = max(lock_ttl / 3, 0.05)
        self._heartbeat = heartbeat
        self._changed = asyncio.Event()
        self._wake_writer = asyncio.Event()
        self._last_emit = time.monotonic()
        self._closing = False
        self._flushing = False
        self._writer = asyncio.create_task(self._write_log(), name=f"turn-log-{turn_id}")
        self._keeper = asyncio.create_task(self._keep_alive(), name=f"turn-lock-{turn_id}")

    # -- emitting ------------------------------------------------------------------------
    def _next_seq(self) -> int:
        return len(self.events) + 1

    def emit(self, type_: str, payload: dict) -> Event:
        return self.push(ev.encode(self.turn_id, self._next_seq(), type_, payload))

    def emit_text(self, text: str) -> Event:
        return self.push(ev.text_delta(self.turn_id, self._next_seq(), text))

    def push(self, event: Event) -> Event:
        self.events.append(event)
        self.pending.append(event)
        self._last_emit = time.monotonic()
        self._wake_writer.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return event

    def terminal_event(self, type_: str, payload: dict) -> Event:
        """Build (but do not publish) the last event: it is committed with the turn."""
        return ev.encode(self.turn_id, self._next_seq(), type_, payload)

    # -- ending --------------------------------------------------------------------------
    async def stop_writers(self) -> list[Event]:
        """Stop the background tasks; return events not yet written to the log.

        A flush in flight is allowed to finish rather than cancelled: redis-py can swallow a
        cancellation that lands mid-command, which would leave the task running."""
        self._closing = True
        self._wake_writer.set()
        if not self._flushing:
            self._writer.cancel()
        self._keeper.cancel()
        done, pending = await asyncio.wait([self._writer, self._keeper], timeout=5.0)
        for task in pending:
            log.warning("turn %s: %s did not stop", self.turn_id, task.get_name())
        unsent, self.pending = self.pending, []
        return unsent

    def publish_final(self, event: Event) -> None:
        """Local followers see the terminal event once it is committed."""
        self.events.append(event)
        self.done = True
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- following -----------------------------------------------------------------------
    async def follow(self, after_seq: int = 0) -> AsyncIterator[list[Event]]:
        """Batches of events after `after_seq` until the terminal one; `[]` is a heartbeat
        tick (no event for `heartbeat` seconds)."""
        i = max(after_seq, 0)
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
            changed = self._changed
            tick = asyncio.get_running_loop().call_later(self._heartbeat, changed.set)
            await changed.wait()
            tick.cancel()
            if i >= len(self.events) and not self.done:
                # Woken by the heartbeat tick, not by an event: re-arm before waiting again.
                if self._changed is changed:
                    self._changed = asyncio.Event()
                yield []

    # -- background ----------------------------------------------------------------------
    async def _write_log(self) -> None:
        while not self._closing:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            if self._closing:
                return
            batch, self.pending = self.pending, []
            if batch:
                self._flushing = True
                try:
                    await self.store.append_events(self.session_id, self.turn_id, batch)
                except Exception:
                    # Keep them: the next flush or the commit writes them, in order.
                    self.pending[:0] = batch
                    log.warning("event log flush failed; will retry", exc_info=True)
                finally:
                    self._flushing = False
            if self._flush_interval and not self._closing:
                await asyncio.sleep(self._flush_interval)

    async def _keep_alive(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._renew_every)
            if self._closing:
                return
            try:
                if not await self.store.renew_lock(self.session_id, self.turn_id):
                    log.warning("turn %s lost its session lock", self.turn_id)
                    return
            except Exception:
                log.warning("lock renewal failed", exc_info=True)
