"""In-process store for one worker (development, tests, single-process deploys): the Redis
backend's semantics, lock expiry and TTLs included. Never used with more than one worker."""

from __future__ import annotations

import asyncio
import json
import time
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

from ..events import Event
from ..usage import Usage
from .base import (ABANDONED_SEQ, ANSWERED, BeginResult, Busy, Duplicate, LogBatch, NoticeHandler, NotFound, Rewind,
                   RewindRefused, SessionMeta, SessionPage, SessionView, Started, TurnCommit, locate_rewind)


@dataclass
class _Session:
    meta: SessionMeta
    history: list[dict[str, Any]] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)
    expires_at: float = 0.0
    lock: tuple[str, float] | None = None  # (turn id, expires at)
    message_ids: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (turn, expires at)
    # (turn id, expires at, {tool_use_id: kind}, {tool_use_id: answer JSON}): the calls a turn waits for
    waiting: tuple[str, float, dict[str, str], dict[str, str]] | None = None


@dataclass
class _Log:
    events: list[Event] = field(default_factory=list)
    expires_at: float = float("inf")
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def _live(table: dict[Any, Any], key: Any) -> Any:
    """The entry if it has not expired (an expired one is dropped: Redis would have)."""
    item = table.get(key)
    if item is not None and item.expires_at < time.monotonic():
        del table[key]
        return None
    return item


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
        self._index: dict[str, dict[str, int]] = {}  # owner -> {session id: updated ms}
        self._on_notice: NoticeHandler | None = None
        self._finished = 0

    def _session(self, session_id: str, owner: str | None = None) -> _Session | None:
        s = _live(self._sessions, session_id)
        return None if s is None or (owner is not None and s.meta.owner != owner) else s

    def _holder(self, s: _Session | None) -> str | None:
        return s.lock[0] if s and s.lock and s.lock[1] > time.monotonic() else None

    def _append(self, session_id: str, turn_id: str, events: list[Event]) -> _Log:
        log = self._logs[(session_id, turn_id)] = _live(self._logs, (session_id, turn_id)) or _Log()
        log.events.extend(events)
        if len(log.events) > self.log_maxlen:
            del log.events[: len(log.events) - self.log_maxlen]
        log.changed.set()
        log.changed = asyncio.Event()
        return log

    async def begin_turn(self, session_id: str, turn_id: str, *, owner: str, create: bool,
                         message_id: str | None, title: str | None = None, rewind: Rewind | None = None,
                         regenerate: bool = False) -> BeginResult:
        now = time.monotonic()
        # Ownership first: another principal's message_id answers as a missing session.
        s = self._session(session_id, None if create else owner)
        if create and s is None:
            created = time.time()
            s = self._sessions[session_id] = _Session(SessionMeta(
                owner=owner, created_at=created, updated_ms=int(created * 1000), title=title or None,
                title_source="message" if title else None))
            self._index.setdefault(owner, {})[session_id] = s.meta.updated_ms
        elif create or s is None:  # a session to create exists, or one to continue does not (for owner)
            return NotFound()
        if (seen := s.message_ids.get(message_id)) and seen[1] > now:  # (None when no message_id was given)
            return Duplicate(seen[0])
        if (holder := self._holder(s)) is not None:
            return Busy(holder)
        located = locate_rewind(s.turns, rewind, regenerate) if rewind is not None else None
        if isinstance(located, RewindRefused):
            return located
        s.lock = (turn_id, now + self.lock_ttl)
        stale = s.meta.active_turn_id
        s.meta.active_turn_id = s.meta.last_turn_id = turn_id
        s.expires_at = now + self.session_ttl
        if message_id is not None:
            s.message_ids[message_id] = (turn_id, now + self.idempotency_ttl)
        self._append(session_id, turn_id, [])
        started = Started(meta=deepcopy(s.meta), history=list(s.history), stale_turn_id=stale)
        if located is not None:
            started.cut, started.kept_turns, started.rewound = located
        return started

    async def renew_lock(self, session_id: str, turn_id: str) -> bool:
        s = self._session(session_id)
        if self._holder(s) != turn_id:
            return False
        s.lock = (turn_id, time.monotonic() + self.lock_ttl)
        return True

    async def flush(self, batches: list[LogBatch], renewals: list[tuple[str, str]]) -> list[bool]:
        for batch in batches:
            self._append(batch.session_id, batch.turn_id, batch.events)
        return [await self.renew_lock(sid, tid) for sid, tid in renewals]

    async def finish_turn(self, session_id: str, turn_id: str, commit: TurnCommit) -> bool:
        s = self._session(session_id)
        if self._holder(s) != turn_id:
            return False
        m = s.meta
        if commit.cut is not None:
            del s.history[commit.cut:], s.turns[commit.kept_turns:]
            m.message_count, m.turns = commit.cut, commit.kept_turns
        if commit.title and m.title_source == "message":
            m.title = commit.title
        if commit.summary is not None:
            m.summary, m.summary_upto = commit.summary or None, commit.summary_upto if commit.summary else 0
        # Stored as JSON round trips so nothing shares mutable state with the caller.
        s.history.extend(json.loads(json.dumps(message)) for message in commit.messages)
        s.turns.append(dict(commit.record))
        m.usage.add(commit.usage)
        m.cost_usd += commit.cost_usd
        m.turns += 1
        m.message_count += len(commit.messages)
        if commit.last_input_tokens:
            m.last_input_tokens, m.last_input_chars = commit.last_input_tokens, commit.last_input_chars
        m.active_turn_id = None
        if commit.preview:
            m.preview = commit.preview
        m.updated_ms = int(time.time() * 1000)
        if commit.owner:
            self._index.setdefault(commit.owner, {})[session_id] = m.updated_ms
        s.lock = None
        s.expires_at = time.monotonic() + self.session_ttl
        self._append(session_id, turn_id, commit.events).expires_at = time.monotonic() + self.log_ttl
        self._finished += 1
        if self._finished % 100 == 0:  # drop what has expired (Redis does this by itself with TTLs)
            for table in (self._sessions, self._logs):
                for key in list(table):
                    _live(table, key)
            for owner, index in list(self._index.items()):
                for sid in [sid for sid in index if sid not in self._sessions]:
                    del index[sid]
                if not index:
                    del self._index[owner]
        return True

    async def abandon_turn(self, session_id: str, turn_id: str, error_fields: str) -> bool:
        s = self._session(session_id)
        log = _live(self._logs, (session_id, turn_id))
        if self._holder(s) == turn_id or (log is not None and log.events and log.events[-1].terminal):
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
        log = _live(self._logs, (session_id, turn_id))
        if log is None:
            await asyncio.sleep(block_ms / 1000)
            return []
        if block_ms > 0 and not any(e.seq > after_seq for e in log.events):
            try:
                await asyncio.wait_for(log.changed.wait(), block_ms / 1000)
            except asyncio.TimeoutError:
                return []
        return [e for e in log.events if e.seq > after_seq]

    async def has_log(self, session_id: str, turn_id: str) -> bool:
        return _live(self._logs, (session_id, turn_id)) is not None

    async def lock_holder(self, session_id: str) -> str | None:
        return self._holder(self._session(session_id))

    async def last_turn(self, session_id: str, owner: str) -> tuple[str | None, bool] | None:
        s = self._session(session_id, owner)
        turn_id = s.meta.last_turn_id if s else None
        return None if s is None else (turn_id, turn_id is not None and self._holder(s) == turn_id)

    async def get_session(self, session_id: str, owner: str) -> SessionView | None:
        s = self._session(session_id, owner)
        return None if s is None else SessionView(meta=deepcopy(s.meta), history=list(s.history), turns=list(s.turns))

    async def delete_session(self, session_id: str, owner: str) -> bool:
        if self._session(session_id, owner) is None:
            return False
        del self._sessions[session_id]
        self._index.get(owner, {}).pop(session_id, None)
        for key in [k for k in self._logs if k[0] == session_id]:
            del self._logs[key]
        return True

    async def list_sessions(self, owner: str, limit: int, after: tuple[int, str] | None) -> SessionPage:
        index = self._index.get(owner, {})
        live = {sid: s for sid in list(index) if (s := self._session(sid, owner)) is not None}
        for sid in [sid for sid in index if sid not in live]:
            del index[sid]  # expired (or deleted): dropped, as Redis's listing does
        order = sorted(((ms, sid) for sid, ms in index.items() if after is None or (ms, sid) < after), reverse=True)
        page = []
        for ms, sid in order[:limit]:
            meta = deepcopy(live[sid].meta)
            meta.updated_ms = ms
            page.append((sid, meta))
        return SessionPage(page, order[limit - 1] if len(order) > limit else None)

    async def rename_session(self, session_id: str, owner: str, title: str) -> SessionMeta | None:
        s = self._session(session_id, owner)
        if s is None:
            return None
        s.meta.title, s.meta.title_source = title, "user"
        return deepcopy(s.meta)

    async def add_model_title(self, session_id: str, owner: str, title: str, usage: Usage,
                              cost_usd: float) -> bool:
        s = self._session(session_id, owner)
        if s is None:
            return False
        if title and s.meta.title_source == "message":
            s.meta.title, s.meta.title_source = title, "model"
        s.meta.usage.add(usage)
        s.meta.cost_usd += cost_usd
        return True

    async def publish_cancel(self, turn_id: str) -> None:
        if self._on_notice is not None:
            self._on_notice(turn_id)

    def _waiting(self, s: _Session | None, turn_id: str | None = None) -> tuple[str, float, dict, dict] | None:
        """The session's waiting tool calls, while their turn still holds the lock (and is `turn_id`)."""
        w = s.waiting if s is not None else None
        if w is None or w[1] < time.monotonic() or self._holder(s) != w[0] or turn_id not in (None, w[0]):
            return None
        return w

    async def wait_for_tools(self, session_id: str, turn_id: str, calls: dict[str, str], ttl: float) -> None:
        s = self._session(session_id)
        if s is not None:
            s.waiting = (turn_id, time.monotonic() + ttl, dict(calls), {})

    async def answer_tool(self, session_id: str, owner: str, tool_use_id: str, kind: str,
                          answer: str) -> tuple[str, str | None]:
        s = self._session(session_id, owner)
        if s is None:
            return "not_found", None
        w = self._waiting(s)
        if w is None or tool_use_id not in w[2]:
            return "not_pending", None
        if w[2][tool_use_id] != kind:
            return "wrong_kind", w[2][tool_use_id]
        if tool_use_id in w[3]:
            return "answered", None
        w[3][tool_use_id] = answer
        return "ok", w[0]

    async def tool_answers(self, session_id: str, turn_id: str, close: bool) -> dict[str, str]:
        s = self._session(session_id)
        w = self._waiting(s, turn_id)
        if w is None:
            return {}
        if close:
            s.waiting = None  # type: ignore[union-attr]
        return dict(w[3])

    async def waiting_tools(self, session_id: str, owner: str) -> tuple[str | None, dict[str, str]] | None:
        s = self._session(session_id, owner)
        if s is None:
            return None
        w = self._waiting(s)
        if w is None:
            return self._holder(s), {}
        return w[0], {call: kind for call, kind in w[2].items() if call not in w[3]}

    async def notify_answered(self, turn_id: str) -> None:
        if self._on_notice is not None:
            self._on_notice(ANSWERED + turn_id)

    async def start(self, on_notice: NoticeHandler) -> None:
        self._on_notice = on_notice

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._on_notice = None
