"""In-process store for one worker (development, tests, single-process deploys): the Redis
backend's semantics, lock expiry and TTLs included. Never used with more than one worker."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..events import Event
from .base import (ABANDONED_SEQ, BeginResult, Busy, CancelHandler, Duplicate, LogBatch, NotFound, SessionMeta,
                   SessionView, Started, TurnCommit)


@dataclass
class _Session:
    meta: SessionMeta
    history: list[dict[str, Any]] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)
    expires_at: float = 0.0
    lock: tuple[str, float] | None = None  # (turn id, expires at)


@dataclass
class _Log:
    events: list[Event] = field(default_factory=list)
    expires_at: float = float("inf")
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryStore:
    def __init__(self, *, session_ttl: float, lock_ttl: float, log_ttl: float, log_maxlen: int,
                 idempotency_ttl: float):
        self.session_ttl = session_ttl
        self.lock_ttl = lock_ttl
        self.log_ttl = log_ttl
        self.log_maxlen = log_maxlen
        self.idempotency_ttl = idempotency_ttl
        self._sessions: dict[str, _Session] = {}
        self._logs: dict[tuple[str, str], _Log] = {}
        self._message_ids: dict[str, dict[str, tuple[str, float]]] = {}  # session -> id -> (turn, expiry)
        self._on_cancel: CancelHandler | None = None
        self._finished = 0

    # -- helpers -------------------------------------------------------------------------
    def _session(self, session_id: str, owner: str | None = None) -> _Session | None:
        s = self._sessions.get(session_id)
        if s is not None and s.expires_at < time.monotonic():
            del self._sessions[session_id]
            return None
        return None if s is None or (owner is not None and s.meta.owner != owner) else s

    def _holder(self, s: _Session) -> str | None:
        if s.lock and s.lock[1] > time.monotonic():
            return s.lock[0]
        return None

    def _log(self, session_id: str, turn_id: str) -> _Log | None:
        log = self._logs.get((session_id, turn_id))
        if log is not None and log.expires_at < time.monotonic():
            del self._logs[(session_id, turn_id)]
            return None
        return log

    def _append(self, session_id: str, turn_id: str, events: list[Event]) -> _Log:
        """Append to the turn's log (created if need be); returns the log."""
        log = self._log(session_id, turn_id)
        if log is None:
            log = self._logs[(session_id, turn_id)] = _Log()
        log.events.extend(events)
        if len(log.events) > self.log_maxlen:
            del log.events[: len(log.events) - self.log_maxlen]
        log.changed.set()
        log.changed = asyncio.Event()
        return log

    # -- Store ---------------------------------------------------------------------------
    async def begin_turn(self, session_id: str, turn_id: str, *, owner: str, create: bool,
                         message_id: str | None) -> BeginResult:
        now = time.monotonic()
        # Ownership first: another principal's message_id answers as a missing session.
        if create:
            if self._session(session_id) is not None:
                return NotFound()
            self._message_ids.pop(session_id, None)  # of a session that expired or was deleted
            s = self._sessions[session_id] = _Session(SessionMeta(owner=owner, created_at=time.time()))
        else:
            s = self._session(session_id, owner)
            if s is None:
                return NotFound()
        if message_id is not None:
            seen = self._message_ids.get(session_id, {}).get(message_id)
            if seen and seen[1] > now:
                return Duplicate(seen[0])
        holder = self._holder(s)
        if holder is not None:
            return Busy(holder)
        s.lock = (turn_id, now + self.lock_ttl)
        stale = s.meta.active_turn_id
        s.meta.active_turn_id = turn_id
        s.meta.last_turn_id = turn_id
        s.expires_at = now + self.session_ttl
        if message_id is not None:
            self._message_ids.setdefault(session_id, {})[message_id] = (turn_id, now + self.idempotency_ttl)
        self._append(session_id, turn_id, [])
        return Started(meta=_copy_meta(s.meta), history=list(s.history), stale_turn_id=stale)

    async def renew_lock(self, session_id: str, turn_id: str) -> bool:
        s = self._session(session_id)
        if s is None or self._holder(s) != turn_id:
            return False
        s.lock = (turn_id, time.monotonic() + self.lock_ttl)
        return True

    async def flush(self, batches: list[LogBatch], renewals: list[tuple[str, str]]) -> list[bool]:
        for batch in batches:
            self._append(batch.session_id, batch.turn_id, batch.events)
        return [await self.renew_lock(sid, tid) for sid, tid in renewals]

    async def finish_turn(self, session_id: str, turn_id: str, commit: TurnCommit) -> bool:
        s = self._session(session_id)
        if s is None or self._holder(s) != turn_id:
            return False
        # Stored as JSON round trips so nothing shares mutable state with the caller.
        s.history.extend(json.loads(json.dumps(m)) for m in commit.messages)
        s.turns.append(dict(commit.record))
        m = s.meta
        m.usage.add(commit.usage)
        m.cost_usd += commit.cost_usd
        m.turns += 1
        m.message_count += len(commit.messages)
        if commit.last_input_tokens:
            m.last_input_tokens = commit.last_input_tokens
            m.last_input_chars = commit.last_input_chars
        m.active_turn_id = None
        s.lock = None
        s.expires_at = time.monotonic() + self.session_ttl
        self._append(session_id, turn_id, commit.events).expires_at = time.monotonic() + self.log_ttl
        self._finished += 1
        if self._finished % 100 == 0:
            self._sweep()
        return True

    def _sweep(self) -> None:
        """Drop what has expired (Redis does this by itself with TTLs)."""
        now = time.monotonic()
        for sid in [k for k, s in self._sessions.items() if s.expires_at < now]:
            del self._sessions[sid]
        for key in [k for k, log in self._logs.items() if log.expires_at < now]:
            del self._logs[key]
        for sid in [k for k in self._message_ids if k not in self._sessions]:
            del self._message_ids[sid]

    async def abandon_turn(self, session_id: str, turn_id: str, error_fields: str) -> bool:
        s = self._session(session_id)
        if s is not None and self._holder(s) == turn_id:
            return False
        log = self._log(session_id, turn_id)
        if log is not None and log.events and log.events[-1].terminal:
            return False
        eid = f"{turn_id}:{ABANDONED_SEQ}"
        data = f'{{"type":"error","id":"{eid}",{error_fields}}}'.encode()
        log = self._append(session_id, turn_id, [Event(ABANDONED_SEQ, "error", eid, data)])
        log.expires_at = time.monotonic() + self.log_ttl
        if s is not None and s.meta.active_turn_id == turn_id:
            s.meta.active_turn_id = None
        return True

    async def read_events(self, session_id: str, turn_id: str, after_seq: int,
                          block_ms: int) -> list[Event]:
        log = self._log(session_id, turn_id)
        if log is None:
            await asyncio.sleep(block_ms / 1000)
            return []
        newer = [e for e in log.events if e.seq > after_seq]
        if newer or block_ms <= 0:
            return newer
        try:
            await asyncio.wait_for(log.changed.wait(), block_ms / 1000)
        except asyncio.TimeoutError:
            return []
        return [e for e in log.events if e.seq > after_seq]

    async def has_log(self, session_id: str, turn_id: str) -> bool:
        return self._log(session_id, turn_id) is not None

    async def lock_holder(self, session_id: str) -> str | None:
        s = self._session(session_id)
        return self._holder(s) if s else None

    async def last_turn(self, session_id: str, owner: str) -> tuple[str | None, bool] | None:
        s = self._session(session_id, owner)
        if s is None:
            return None
        turn_id = s.meta.last_turn_id
        return turn_id, turn_id is not None and self._holder(s) == turn_id

    async def get_session(self, session_id: str, owner: str) -> SessionView | None:
        s = self._session(session_id, owner)
        if s is None:
            return None
        return SessionView(meta=_copy_meta(s.meta), history=list(s.history), turns=list(s.turns))

    async def delete_session(self, session_id: str, owner: str) -> bool:
        if self._session(session_id, owner) is None:
            return False
        del self._sessions[session_id]
        for key in [k for k in self._logs if k[0] == session_id]:
            del self._logs[key]
        self._message_ids.pop(session_id, None)
        return True

    async def publish_cancel(self, turn_id: str) -> None:
        if self._on_cancel is not None:
            result = self._on_cancel(turn_id)
            if asyncio.iscoroutine(result):
                await result

    async def start(self, on_cancel: CancelHandler) -> None:
        self._on_cancel = on_cancel

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._on_cancel = None


def _copy_meta(m: SessionMeta) -> SessionMeta:
    return replace(m, usage=replace(m.usage))
