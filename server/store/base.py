"""The store interface: session history, the per-session turn lock and the per-turn event log.

Backends: `memory` (one process) and `redis` (several workers and machines); the engine is
their only caller. Every backend keeps these guarantees:
- `begin_turn` is atomic: ownership, idempotency, the session lock and the history in one step;
- `finish_turn` is fenced: it commits only while the caller holds the lock, and appends the
  turn's messages (never a rewrite of the history);
- a turn's event log (bounded) outlives the turn for a while: clients resume on any worker.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Protocol

from ..events import Event
from ..usage import Usage

# The sequence number of the `error` event that ends a turn whose worker died: above any real
# event's, so its id never names another event and every resuming client still receives it
# (that worker may have handed its followers events that never reached the log, so the number
# after the log's last could name an event a client already has).
# (Nine digits: the longest an event id may carry, see events.resume_after.)
ABANDONED_SEQ = 999_999_999

_ID_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")  # fullmatch: `$` would let "…\n" through
_MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def new_id() -> str:
    """128 random bits, URL-safe: session and turn ids; never starting with `-` (a command
    line would take a pasted id for an option)."""
    while True:
        value = secrets.token_urlsafe(16)
        if value[0] != "-":
            return value


def valid_id(value: object) -> bool:
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value))


def valid_message_id(value: object) -> bool:
    return isinstance(value, str) and bool(_MESSAGE_ID_RE.fullmatch(value))


@lru_cache(maxsize=4096)
def principal_tag(principal: str) -> str:
    """A principal as a key's hash tag (its sessions' index): a digest, since a principal may
    hold any character (`}` too)."""
    return hashlib.sha256(principal.encode("utf-8", "surrogatepass")).hexdigest()[:20]


@dataclass(slots=True)
class SessionMeta:
    owner: str
    created_at: float
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    turns: int = 0
    message_count: int = 0
    last_turn_id: str | None = None
    active_turn_id: str | None = None
    last_input_tokens: int = 0   # prompt tokens of the last model call: calibrates estimates
    last_input_chars: int = 0    # characters that produced them
    # What a list of conversations shows (server/sessions.py): set at creation, and by commits,
    # renames and the title model.
    title: str | None = None
    title_source: str | None = None  # "message" | "model" | "user"
    preview: str = ""
    updated_ms: int = 0  # last activity (creation, a commit), unix ms: the index's order
    # Compaction (server/compaction.py): what the model sees in place of history[:summary_upto].
    summary: str | None = None
    summary_upto: int = 0


class StoredMessage(Mapping[str, Any]):
    """A history message as the store holds it: its JSON, parsed only if someone looks inside
    (the request body splices `raw` as it is, and `context.message_chars` sizes it from `raw`)."""

    __slots__ = ("raw", "_value")

    def __init__(self, raw: bytes):
        self.raw = raw
        self._value: dict[str, Any] | None = None

    @property
    def value(self) -> dict[str, Any]:
        if self._value is None:
            self._value = json.loads(self.raw)
        return self._value

    def __getitem__(self, key: str) -> Any:
        return self.value[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def __repr__(self) -> str:
        return f"StoredMessage({self.raw[:60]!r})"


@dataclass(frozen=True, slots=True)
class Rewind:
    """Where a turn takes its session back to (edit, regenerate): to just before `turn_id`
    (that turn and every later one are replaced), or, with `keep`, to just after it. turn_id
    None: to the start. Applied by the turn's commit, and only if it commits messages."""
    turn_id: str | None
    keep: bool = False


@dataclass(slots=True)
class Started:
    """The lock is ours; here is the history to build the request from."""
    meta: SessionMeta
    history: list[Mapping[str, Any]]  # StoredMessage (redis) or plain dicts (memory)
    stale_turn_id: str | None = None  # a previous turn whose worker died without finishing
    # A rewind: the history kept is history[:cut], the turn records kept are the first `kept_turns`,
    # and these turns are the ones replaced.
    cut: int | None = None
    kept_turns: int = 0
    rewound: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Busy:
    running_turn_id: str


@dataclass(slots=True)
class Duplicate:
    """The same `message_id` already started this turn: join it instead of running twice."""
    turn_id: str


class NotFound:
    pass


@dataclass(slots=True)
class RewindRefused:
    """`turn_not_found` (no such turn in the session's records) or `nothing_to_regenerate`
    (the turn to send again left no message)."""
    reason: str


BeginResult = Started | Busy | Duplicate | NotFound | RewindRefused


@dataclass(slots=True)
class TurnCommit:
    """Everything a finished turn writes, in one fenced step."""
    messages: list[dict[str, Any]]       # appended to the history (may be empty: failed turn)
    record: dict[str, Any]               # the turn's summary, appended to the turn list
    usage: Usage
    cost_usd: float
    last_input_tokens: int
    last_input_chars: int
    events: list[Event]                  # the log's last events (the terminal one included)
    owner: str = ""                      # the session's: its index entry moves to the top ("": not indexed)
    preview: str = ""                    # the new last message's text ("": unchanged)
    # A rewind (Started.cut, .kept_turns): history and turn records are cut there before the append.
    cut: int | None = None
    kept_turns: int = 0
    # Compaction: None leaves the stored summary as it is; "" drops it; else the new one, covering
    # history[:summary_upto] (after the cut).
    summary: str | None = None
    summary_upto: int = 0
    # The new first message's title (an edit of the first turn): replaces a title taken from the
    # old first message ("": unchanged).
    title: str = ""


@dataclass(slots=True)
class LogBatch:
    """Events of one turn to append to its log in one entry (`first`: its first write)."""
    session_id: str
    turn_id: str
    events: list[Event]
    first: bool = False


@dataclass(slots=True)
class SessionView:
    meta: SessionMeta
    history: list[dict[str, Any]]
    turns: list[dict[str, Any]]


@dataclass(slots=True)
class SessionPage:
    """A page of a principal's sessions, newest activity first."""
    sessions: list[tuple[str, SessionMeta]]
    next: tuple[int, str] | None  # (updated ms, session id) of the last one, when more follow


def locate_rewind(records: list[Mapping[str, Any]], rewind: Rewind,
                  regenerate: bool) -> tuple[int, int, list[str]] | RewindRefused:
    """(history messages kept, turn records kept, ids of the turns replaced) for a rewind, from
    the session's turn records (each holds how many messages its turn appended). The Redis
    backend does the same in its begin script."""
    at, found = 0, rewind.turn_id is None
    cut, kept, rewound = (0, 0, []) if found else (-1, 0, [])
    for i, record in enumerate(records):
        n = int(record.get("messages") or 0)
        if found:
            rewound.append(str(record.get("turn_id")))
        elif record.get("turn_id") == rewind.turn_id:
            found = True
            if rewind.keep:
                cut, kept = at + n, i + 1
            elif regenerate and n == 0:
                return RewindRefused("nothing_to_regenerate")
            else:
                cut, kept = at, i
                rewound.append(rewind.turn_id)
        at += n
    return (cut, kept, rewound) if found else RewindRefused("turn_not_found")


# The engine's `on_notice`, called on every worker with each published notice: a turn id to
# cancel, or ANSWERED + a turn id whose waiting tool calls got an answer.
NoticeHandler = Callable[[str], object]
ANSWERED = "!"  # (never the first character of a turn id)


class Store(Protocol):
    """What the engine asks of a backend: `MemoryStore` and `RedisStore` (tests/test_store.py runs both)."""
    # `title`: a new session's (from its first message; ignored when continuing one). `rewind`:
    # where the turn takes the history back to (found among the turn records under the lock);
    # `regenerate`: the replaced turn's own user message is sent again (it must have left one).
    async def begin_turn(self, session_id: str, turn_id: str, *, owner: str, create: bool,
                         message_id: str | None, title: str | None = None, rewind: Rewind | None = None,
                         regenerate: bool = False) -> BeginResult: ...
    async def renew_lock(self, session_id: str, turn_id: str) -> bool: ...
    # Appends event batches to their turns' logs and renews (session, turn) locks, in one round
    # trip; returns whether each lock was still held.
    async def flush(self, batches: list[LogBatch], renewals: list[tuple[str, str]]) -> list[bool]: ...
    # False when the lock was lost (fenced): nothing was written. A commit's `cut` trims history
    # and turn records first (a rewind), in the same step.
    async def finish_turn(self, session_id: str, turn_id: str, commit: TurnCommit) -> bool: ...
    # If the turn's lock is gone and its log has no terminal event, appends an `error` event at
    # `ABANDONED_SEQ` (`error_fields`: its JSON members after `type` and `id`); True if so.
    async def abandon_turn(self, session_id: str, turn_id: str, error_fields: str) -> bool: ...
    async def read_events(self, session_id: str, turn_id: str, after_seq: int, block_ms: int) -> list[Event]: ...
    async def lock_holder(self, session_id: str) -> str | None: ...
    # Whether the turn's event log still exists (it expires after the turn).
    async def has_log(self, session_id: str, turn_id: str) -> bool: ...
    # (last turn id, is it running), or None when the session does not exist for owner.
    async def last_turn(self, session_id: str, owner: str) -> tuple[str | None, bool] | None: ...
    async def get_session(self, session_id: str, owner: str) -> SessionView | None: ...
    async def delete_session(self, session_id: str, owner: str) -> bool: ...
    # The owner's sessions, newest activity first (updated ms desc, then session id desc), after
    # `after` (a page's `next`); index entries of sessions that expired are dropped on the way.
    async def list_sessions(self, owner: str, limit: int, after: tuple[int, str] | None) -> SessionPage: ...
    # Sets the title (title_source "user"); the session's meta after, or None (not the owner's).
    async def rename_session(self, session_id: str, owner: str, title: str) -> SessionMeta | None: ...
    # The title model's answer: the title is set only while title_source is "message"; the
    # call's usage and cost are added to the session's totals either way. False: no session.
    async def add_model_title(self, session_id: str, owner: str, title: str, usage: Usage,
                              cost_usd: float) -> bool: ...
    async def publish_cancel(self, turn_id: str) -> None: ...
    # The tool calls a turn waits for ({tool_use_id: "approval" | "client"}), replacing any it
    # waited for before; kept for `ttl` seconds at most.
    async def wait_for_tools(self, session_id: str, turn_id: str, calls: dict[str, str], ttl: float) -> None: ...
    # Records the answer to a waiting call, fenced like a commit (the waiting turn must still hold
    # the lock): ("ok", turn id), ("not_found", None) (no session for owner), ("not_pending", None),
    # ("answered", None) (already), or ("wrong_kind", the kind the call waits for).
    async def answer_tool(self, session_id: str, owner: str, tool_use_id: str, kind: str,
                          answer: str) -> tuple[str, str | None]: ...
    # The answers given so far to the turn's waiting calls (JSON by tool_use_id); `close` also
    # ends the wait, atomically, so that a later answer is `not_pending`.
    async def tool_answers(self, session_id: str, turn_id: str, close: bool) -> dict[str, str]: ...
    # (running turn id, {tool_use_id: kind} of its calls still waiting for an answer), or None
    # when the session does not exist for owner.
    async def waiting_tools(self, session_id: str, owner: str) -> tuple[str | None, dict[str, str]] | None: ...
    async def notify_answered(self, turn_id: str) -> None: ...
    async def start(self, on_notice: NoticeHandler) -> None: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...
