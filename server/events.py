"""The event vocabulary shared by every transport, encoded once per event.

An event is JSON with `type` and `id` (`<turn_id>:<seq>`, also the SSE `id:` and the position in
the turn's event log). It is serialised exactly once, when the turn emits it: transports and the
event log only copy bytes, which keeps the per-token cost flat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # compact JSON text, as on the wire


@dataclass(slots=True)
class Event:
    seq: int
    type: str
    id: str
    data: bytes  # compact JSON of the whole event, including "type" and "id"

    @property
    def terminal(self) -> bool:
        return self.type in {"turn_end", "error"}  # (compiled to a frozenset constant)


def encode(turn_id: str, seq: int, type_: str, payload: dict[str, Any]) -> Event:
    eid = f"{turn_id}:{seq}"
    return Event(seq, type_, eid, dumps({"type": type_, "id": eid, **payload}).encode())


def unlogged(seq: int, type_: str, payload: dict[str, Any]) -> Event:
    """A notice from this worker that is not one of the turn's logged events (a follower
    told to reconnect elsewhere): no id, so a client's Last-Event-ID stays on the last
    real event. `seq` only orders it for the transports."""
    return Event(seq, type_, "", dumps({"type": type_, **payload}).encode())


def text_delta(turn_id: str, seq: int, text: str, text_json: str | None = None) -> Event:
    """The hot path: built by string formatting, not a dict round trip. `text_json` is the
    text already as a JSON string (as the upstream sent it), reused as is."""
    eid = f"{turn_id}:{seq}"
    return Event(seq, "text_delta", eid,
                 f'{{"type":"text_delta","id":"{eid}","text":{text_json or dumps(text)}}}'.encode())


def text_literal(event: Event) -> str:
    """The JSON string literal of a text_delta's text, sliced out of the encoded event without
    parsing it (every text_delta, in memory or in the log, is written by `text_delta`)."""
    return event.data.decode()[len(f'{{"type":"text_delta","id":"{event.id}","text":'):-1]


def resume_after(last_event_id: object, turn_id: str | None) -> int:
    """Where a client resuming `turn_id` with `last_event_id` continues: after that event when
    it is one of this turn's (`<turn_id>:<seq>`, at most 9 ASCII digits), else from the turn's
    start (also for a non-string, as a WebSocket frame can carry, or digits such as "²")."""
    if not isinstance(last_event_id, str):
        return 0
    last_turn, _, seq = last_event_id.rpartition(":")
    if not last_turn or last_turn != turn_id or not seq.isascii() or not seq.isdigit() or len(seq) > 9:
        return 0
    return int(seq)


def sse_frame(event: Event) -> bytes:
    """One Server-Sent Event; `id` lets a client resume with Last-Event-ID."""
    if not event.id:  # (an unlogged notice: the client's Last-Event-ID must not change)
        return b"data: " + event.data + b"\n\n"
    return b"id: " + event.id.encode() + b"\ndata: " + event.data + b"\n\n"
