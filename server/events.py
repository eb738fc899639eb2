"""The event vocabulary shared by SSE and WebSocket, encoded once per event.

An event is JSON with `type` and `id` (`<turn_id>:<seq>`, also the SSE `id:` and the
position in the turn's event log). It is serialised exactly once, when the turn emits it;
transports and the event log only copy bytes, which keeps the per-token cost flat.

Types: `turn_start`, `text_delta`, `tool_call`, `tool_input`, `tool_result`, `turn_end`,
`error` (terminal), plus the transport-level `ping` (WebSocket) and SSE comments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TERMINAL_TYPES = frozenset({"turn_end", "error"})

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(slots=True)
class Event:
    seq: int
    type: str
    id: str
    data: bytes  # compact JSON of the whole event, including "type" and "id"

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


def encode(turn_id: str, seq: int, type_: str, payload: dict[str, Any]) -> Event:
    eid = f"{turn_id}:{seq}"
    return Event(seq, type_, eid, _dumps({"type": type_, "id": eid, **payload}).encode())


def unlogged(seq: int, type_: str, payload: dict[str, Any]) -> Event:
    """A notice from this worker that is not one of the turn's logged events (a follower
    told to reconnect elsewhere): no id, so a client's Last-Event-ID stays on the last
    real event. `seq` only orders it for the transports."""
    return Event(seq, type_, "", _dumps({"type": type_, **payload}).encode())


def text_delta(turn_id: str, seq: int, text: str, text_json: str | None = None) -> Event:
    """The hot path: built by string formatting, not a dict round trip. `text_json` is the
    text already as a JSON string (as the upstream sent it), reused as is."""
    eid = f"{turn_id}:{seq}"
    return Event(seq, "text_delta", eid,
                 f'{{"type":"text_delta","id":"{eid}","text":{text_json or _dumps(text)}}}'.encode())


def text_literal(event: Event) -> str:
    """The JSON string literal of a text_delta's text, sliced out of the encoded event (as
    `text_delta` writes it) without parsing it."""
    raw = event.data.decode()
    prefix = f'{{"type":"text_delta","id":"{event.id}","text":'
    if raw.startswith(prefix) and raw.endswith('"}'):
        return raw[len(prefix):-1]
    return _dumps(json.loads(raw)["text"])


def parse_event_id(value: object) -> tuple[str, int] | None:
    """`<turn_id>:<seq>` -> (turn_id, seq); None for anything else (also a non-string, as
    a WebSocket frame can carry, and non-ASCII digits such as "²", which int() refuses)."""
    if not isinstance(value, str) or ":" not in value:
        return None
    turn_id, _, seq = value.rpartition(":")
    if not seq.isascii() or not seq.isdigit() or not turn_id or len(seq) > 9:
        return None
    return turn_id, int(seq)


def resume_after(last_event_id: object, turn_id: str | None) -> int:
    """Where a client resuming `turn_id` with `last_event_id` continues: after that event
    when it is one of this turn's, else from the turn's start."""
    last = parse_event_id(last_event_id)
    return last[1] if last and last[0] == turn_id else 0


def sse_frame(event: Event) -> bytes:
    """One Server-Sent Event; `id` lets a client resume with Last-Event-ID."""
    if not event.id:  # (an unlogged notice: the client's Last-Event-ID must not change)
        return b"data: " + event.data + b"\n\n"
    return b"id: " + event.id.encode() + b"\ndata: " + event.data + b"\n\n"
