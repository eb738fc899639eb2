"""What the fake answers: scripts, ``#fake{...}`` directives and the default offline model.

Everything here is pure (no I/O) so it can be unit-tested and so the HTTP layer
only has to write pre-encoded bytes: :func:`build_stream` turns a :class:`Plan`
into a list of ready-to-write, chunk-framed segments, keeping the per-event CPU
cost of a 400-stream benchmark down to one write and one sleep.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # C-accelerated: a JSON string literal, no ensure_ascii
from typing import Any

from .http import chunk

DEFAULT_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

DEFAULT_ERROR_MESSAGES: dict[str, str] = {
    "invalid_request_error": "Invalid request",
    "authentication_error": "invalid x-api-key",
    "billing_error": "Billing error",
    "permission_error": "Permission denied",
    "not_found_error": "Not found",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Rate limited",
    "api_error": "Internal server error",
    "timeout_error": "Request timed out",
    "overloaded_error": "Overloaded",
}

OFFLINE_PREFIX = "This is the offline model (no ANTHROPIC_API_KEY is set). You said: "


def error_type_for(status: int) -> str:
    return DEFAULT_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------------------
# The plan: a fully resolved answer, independent of where it came from
# ---------------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str
    input_json: str  # streamed as-is (may be invalid JSON on purpose)
    id: str

    @property
    def input_value(self) -> Any:
        """The parsed input for a non-streaming body (raw string if it is not valid JSON)."""
        try:
            return json.loads(self.input_json)
        except ValueError:
            return self.input_json


@dataclass
class Plan:
    """A resolved answer. ``status`` != 200 means an HTTP error before any stream."""

    source: str  # "script" | "directive" | "default"
    text: str | None = None
    text_deltas: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    stop_reason: str = "end_turn"
    usage_overrides: dict[str, int] = field(default_factory=dict)
    pace_s: float = 0.0
    ttft_s: float = 0.0
    status: int = 200
    error_type: str | None = None
    message: str | None = None
    retry_after: Any = None
    retry_after_ms: Any = None
    should_retry: bool | None = None
    error_after: int | None = None
    drop_after: int | None = None


def split_words(text: str) -> list[str]:
    """~1 word per delta, whitespace kept, so ``"".join(split_words(t)) == t``."""
    return re.findall(r"\s*\S+\s*|\s+", text) if text else []


def _num(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def plan_from_spec(spec: dict[str, Any], *, source: str, default_pace_ms: float) -> Plan:
    """Turn a script/directive dict into a :class:`Plan` (unknown keys are ignored)."""
    pace = _num(spec, "pace_ms")
    ttft = _num(spec, "ttft_ms")
    plan = Plan(
        source=source,
        pace_s=(default_pace_ms if pace is None else pace) / 1000.0,
        ttft_s=(ttft or 0.0) / 1000.0,
    )
    status = spec.get("status")
    if isinstance(status, int) and status != 200:
        plan.status = status
    plan.error_type = spec.get("error_type") if isinstance(spec.get("error_type"), str) else None
    plan.message = spec.get("message") if isinstance(spec.get("message"), str) else None
    plan.retry_after = spec.get("retry_after")
    plan.retry_after_ms = spec.get("retry_after_ms")
    if isinstance(spec.get("should_retry"), bool):
        plan.should_retry = spec["should_retry"]
    for key in ("error_after", "drop_after"):
        v = spec.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            setattr(plan, key, v)

    if isinstance(spec.get("text"), str):
        plan.text = spec["text"]
        plan.text_deltas = split_words(plan.text)
    elif isinstance(spec.get("tokens"), int) and spec["tokens"] >= 0:
        n = spec["tokens"]
        plan.text_deltas = [f"tok{i}" if i == n - 1 else f"tok{i} " for i in range(n)]
        plan.text = "".join(plan.text_deltas)

    for entry in spec.get("tool_use") or []:
        if not isinstance(entry, dict):
            continue
        raw = entry.get("input", {})
        input_json = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
        plan.tool_calls.append(
            ToolCall(name=str(entry.get("name", "tool")), input_json=input_json, id=str(entry.get("id") or new_id("toolu_")))
        )
    if plan.text is None and not plan.tool_calls:
        plan.text = ""
    plan.stop_reason = "tool_use" if plan.tool_calls else "end_turn"
    if isinstance(spec.get("stop_reason"), str):
        plan.stop_reason = spec["stop_reason"]
    usage = spec.get("usage")
    if isinstance(usage, dict):
        plan.usage_overrides = {k: int(v) for k, v in usage.items() if isinstance(v, (int, float))}
    return plan


# ---------------------------------------------------------------------------
# Reading the request
# ---------------------------------------------------------------------------


def last_user_message(body: dict[str, Any]) -> dict[str, Any] | None:
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return msg
    return None


def message_text(msg: dict[str, Any] | None) -> str:
    """The text of a message: its string content, or its text blocks joined by newlines."""
    if msg is None:
        return ""
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
    return ""


def find_directive(text: str) -> dict[str, Any] | None:
    """The first ``#fake{...}`` JSON object in ``text`` (brace-balanced, string-aware scan)."""
    start = 0
    while True:
        i = text.find("#fake{", start)
        if i < 0:
            return None
        j = i + 5  # at the "{"
        depth, in_str, esc = 0, False, False
        for k in range(j, len(text)):
            c = text[k]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    try:
                        obj = json.loads(text[j : k + 1])
                    except ValueError:
                        break
                    if isinstance(obj, dict):
                        return obj
                    break
        start = i + 1


_EXPR_RUN = re.compile(r"[0-9\s+\-*/().^%]+")
_OPS = set("+-*/^%")


def find_expression(text: str) -> str | None:
    """The longest arithmetic-looking run in ``text`` with a digit and an operator, tidied up."""
    best: str | None = None
    for m in _EXPR_RUN.finditer(text):
        run = m.group(0)
        run = re.sub(r"^[^0-9(.\-]+", "", run)
        run = re.sub(r"[^0-9)%]+$", "", run)
        # drop unmatched outer parentheses ("(what is 2+3)" -> "2+3")
        while run.count("(") > run.count(")") and run.startswith("("):
            run = run[1:].strip()
        while run.count(")") > run.count("(") and run.endswith(")"):
            run = run[:-1].strip()
        if not any(ch.isdigit() for ch in run):
            continue
        body = run.lstrip("-")
        if not any(ch in _OPS for ch in body):
            continue
        if best is None or len(run) > len(best):
            best = run
    return best


def _tool_result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
        )
    return ""


def default_plan(body: dict[str, Any], *, pace_ms: float) -> Plan:
    """The deterministic offline model: calculator tool calls, tool-result echo, or a friendly echo."""
    msg = last_user_message(body)
    content = msg.get("content") if msg else None
    blocks = content if isinstance(content, list) else []
    results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
    if results:
        first = results[0]
        out = _tool_result_text(first)
        text = f"The tool failed: {out}" if first.get("is_error") else f"The result is {out}."
        return plan_from_spec({"text": text}, source="default", default_pace_ms=pace_ms)
    text = message_text(msg)
    tools = body.get("tools") or []
    if any(isinstance(t, dict) and t.get("name") == "calculator" for t in tools):
        expr = find_expression(text)
        if expr:
            return plan_from_spec(
                {"tool_use": [{"name": "calculator", "input": {"expression": expr}}]},
                source="default",
                default_pace_ms=pace_ms,
            )
    said = " ".join(text.split())[:200]
    return plan_from_spec({"text": OFFLINE_PREFIX + said}, source="default", default_pace_ms=pace_ms)


# ---------------------------------------------------------------------------
# Token accounting and the prompt-cache simulation
# ---------------------------------------------------------------------------


def _tokens(obj: Any) -> int:
    return len(json.dumps(obj, ensure_ascii=False)) // 4


def count_input_tokens(body: dict[str, Any]) -> int:
    parts = [body[k] for k in ("system", "tools", "messages") if body.get(k) is not None]
    return max(1, sum(_tokens(p) for p in parts))


def _cache_items(body: dict[str, Any]) -> tuple[list[Any], list[int]]:
    """Flatten the prompt in cache order (tools, system, message blocks), `cache_control`
    stripped; return the items and the indices that carried a breakpoint."""
    items: list[Any] = []
    marks: list[int] = []

    def add(item: Any, block: Any) -> None:
        if isinstance(block, dict) and "cache_control" in block:
            marks.append(len(items))
            block = {k: v for k, v in block.items() if k != "cache_control"}
            item = block if item is None else [item, block]
        elif item is not None:
            item = [item, block]
        else:
            item = block
        items.append(item)

    for tool in body.get("tools") or []:
        add(None, tool)
    system = body.get("system")
    if isinstance(system, list):
        for block in system:
            add(None, block)
    elif system is not None:
        add(None, system)
    for msg in body.get("messages") or []:
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        for block in content if isinstance(content, list) else [content]:
            add(msg.get("role"), block)
    # top-level (automatic) cache_control caches the whole prompt
    if body.get("cache_control") and items:
        marks.append(len(items) - 1)
    return items, marks


LOOKBACK_BLOCKS = 20


class PromptCache:
    """Like the API: each breakpoint writes its prefix; a request reads the longest prefix
    written before that ends at a block boundary up to 20 blocks before one of its breakpoints
    (so a rolling breakpoint on the latest message reads the previous turn's prefix)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def clear(self) -> None:
        self._seen.clear()

    def usage(self, body: dict[str, Any]) -> dict[str, int]:
        total = count_input_tokens(body)
        items, marks = _cache_items(body)
        if not marks:
            return {"input_tokens": total, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        digest = hashlib.sha256(str(body.get("model")).encode())
        keys: list[str] = []
        sizes: list[int] = []
        for item in items:
            encoded = json.dumps(item, sort_keys=True)
            digest.update(b"\0" + encoded.encode())
            keys.append(digest.hexdigest())
            sizes.append(len(encoded))
        read_end = 0
        for mark in marks:
            for j in range(mark, max(-1, mark - LOOKBACK_BLOCKS), -1):
                if keys[j] in self._seen:
                    read_end = max(read_end, j + 1)
                    break
        last = max(marks)
        self._seen.update(keys[m] for m in marks)
        prefix_tokens = max(1, sum(sizes[: last + 1]) // 4)
        read_tokens = min(prefix_tokens, sum(sizes[:read_end]) // 4)
        return {
            "input_tokens": max(1, total - prefix_tokens),
            "cache_creation_input_tokens": prefix_tokens - read_tokens,
            "cache_read_input_tokens": read_tokens,
        }


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def error_body(error_type: str, message: str, request_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_headers(plan: Plan) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    if plan.retry_after is not None:
        headers.append(("retry-after", _fmt_num(plan.retry_after)))
    if plan.retry_after_ms is not None:
        headers.append(("retry-after-ms", _fmt_num(plan.retry_after_ms)))
    if plan.should_retry is not None:
        headers.append(("x-should-retry", "true" if plan.should_retry else "false"))
    return headers


def _fmt_num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _json_chunks(s: str) -> list[str]:
    """Split tool input JSON into several partial_json deltas, the first one empty (as the API does)."""
    if not s:
        return [""]
    size = max(8, -(-len(s) // 4))
    return [""] + [s[i : i + size] for i in range(0, len(s), size)]


def final_usage(plan: Plan, usage: dict[str, int], n_deltas: int) -> dict[str, int]:
    merged = dict(usage)
    merged["output_tokens"] = max(1, n_deltas)
    merged.update(plan.usage_overrides)
    return merged


def count_deltas(plan: Plan) -> int:
    return len(plan.text_deltas) + sum(len(_json_chunks(t.input_json)) for t in plan.tool_calls)


def message_json(plan: Plan, *, model: str, usage: dict[str, int]) -> dict[str, Any]:
    """The non-streaming response body."""
    content: list[dict[str, Any]] = []
    if plan.text is not None:
        content.append({"type": "text", "text": plan.text})
    for t in plan.tool_calls:
        content.append({"type": "tool_use", "id": t.id, "name": t.name, "input": t.input_value})
    u = final_usage(plan, usage, count_deltas(plan))
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": plan.stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": u.get("input_tokens", 1),
            "output_tokens": u.get("output_tokens", 1),
            "cache_creation_input_tokens": u.get("cache_creation_input_tokens", 0),
            "cache_read_input_tokens": u.get("cache_read_input_tokens", 0),
        },
    }


def _event(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


_PING = _event("ping", '{"type":"ping"}')
_MESSAGE_STOP = _event("message_stop", '{"type":"message_stop"}')


@dataclass
class Segment:
    """One write: chunk-framed bytes, the delay before writing them, and how many SSE events they hold."""

    delay: float
    data: bytes
    events: int


@dataclass
class StreamScript:
    segments: list[Segment]
    outcome: str  # "finish" | "error" | "drop"


def build_stream(plan: Plan, *, model: str, usage: dict[str, int]) -> StreamScript:
    """Pre-encode the whole SSE stream.

    Structural events (message_start, ping, block start/stop, message_delta,
    message_stop) ride in the same write as their neighbour; each content delta
    starts a new write paced by ``plan.pace_s``. ``error_after``/``drop_after``
    cut the stream after that many text deltas.
    """
    start_usage = {
        "input_tokens": usage.get("input_tokens", 1),
        "cache_creation_input_tokens": usage.get("cache_creation_input_tokens", 0),
        "cache_read_input_tokens": usage.get("cache_read_input_tokens", 0),
        "output_tokens": 1,
    }
    for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        if k in plan.usage_overrides:
            start_usage[k] = plan.usage_overrides[k]
    message = {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    # (paced, bytes, is_text_delta)
    events: list[tuple[bool, bytes, bool]] = [
        (False, _event("message_start", _dumps({"type": "message_start", "message": message})), False),
        (False, _PING, False),
    ]
    n_deltas = 0
    index = 0
    if plan.text is not None:
        events.append((False, _event("content_block_start",
                                     f'{{"type":"content_block_start","index":{index},"content_block":{{"type":"text","text":""}}}}'), False))
        prefix = f'{{"type":"content_block_delta","index":{index},"delta":{{"type":"text_delta","text":'
        for d in plan.text_deltas:
            events.append((True, _event("content_block_delta", prefix + encode_basestring(d) + "}}"), True))
            n_deltas += 1
        events.append((False, _event("content_block_stop", f'{{"type":"content_block_stop","index":{index}}}'), False))
        index += 1
    for t in plan.tool_calls:
        block = {"type": "tool_use", "id": t.id, "name": t.name, "input": {}}
        events.append((False, _event("content_block_start",
                                     _dumps({"type": "content_block_start", "index": index, "content_block": block})), False))
        prefix = f'{{"type":"content_block_delta","index":{index},"delta":{{"type":"input_json_delta","partial_json":'
        for piece in _json_chunks(t.input_json):
            events.append((True, _event("content_block_delta", prefix + encode_basestring(piece) + "}}"), False))
            n_deltas += 1
        events.append((False, _event("content_block_stop", f'{{"type":"content_block_stop","index":{index}}}'), False))
        index += 1
    u = final_usage(plan, usage, n_deltas)
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": plan.stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": u["output_tokens"]},
    }
    events.append((False, _event("message_delta", _dumps(delta)), False))
    events.append((False, _MESSAGE_STOP, False))

    outcome = "finish"
    cut_after = plan.error_after if plan.error_after is not None else plan.drop_after
    if cut_after is not None:
        outcome = "error" if plan.error_after is not None else "drop"
        # position right after the cut_after-th text delta (or after the ping for 0 / no text)
        pos, seen = 2, 0
        for i, (_, _, is_text) in enumerate(events):
            if is_text:
                seen += 1
                if seen <= cut_after:
                    pos = i + 1
        events = events[:pos]
        if outcome == "error":
            etype = plan.error_type or "overloaded_error"
            err = {"type": "error", "error": {"type": etype, "message": plan.message or "Overloaded"}}
            events.append((False, _event("error", _dumps(err)), False))

    segments: list[Segment] = []
    buf: list[bytes] = []
    delay = plan.ttft_s
    for paced, data, _ in events:
        if paced and plan.pace_s > 0 and buf:
            segments.append(Segment(delay, chunk(b"".join(buf)), len(buf)))
            buf, delay = [], plan.pace_s
        buf.append(data)
    if buf:
        segments.append(Segment(delay, chunk(b"".join(buf)), len(buf)))
    return StreamScript(segments, outcome)
