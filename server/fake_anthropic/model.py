"""What the fake answers: scripts, ``#fake{...}`` directives and the default offline model.

Pure (no I/O), so the HTTP layer only writes bytes: :func:`build_stream` turns a
:class:`Plan` into ready-to-write, chunk-framed segments.
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

# HTTP status -> the API's error type for it and that type's default message
ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Billing error"),
    403: ("permission_error", "Permission denied"),
    404: ("not_found_error", "Not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Rate limited"),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}
DEFAULT_ERROR_MESSAGES: dict[str, str] = dict(ERRORS.values())

OFFLINE_PREFIX = "This is the offline model (no ANTHROPIC_API_KEY is set). You said: "


def error_type_for(status: int) -> str:
    if status in ERRORS:
        return ERRORS[status][0]
    return "api_error" if status >= 500 else "invalid_request_error"


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# -- the plan: a fully resolved answer, whatever it came from -----------------------------


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

    def cut_error(self) -> tuple[str, str]:
        """The error type and message of an ``error_after`` failure."""
        return self.error_type or "overloaded_error", self.message or "Overloaded"


def split_words(text: str) -> list[str]:
    """~1 word per delta, whitespace kept, so ``"".join(split_words(t)) == t``."""
    return re.findall(r"\s*\S+\s*|\s+", text) if text else []


def _num(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _str(d: dict[str, Any], key: str) -> str | None:
    v = d.get(key)
    return v if isinstance(v, str) else None


def plan_from_spec(spec: dict[str, Any], *, source: str, default_pace_ms: float) -> Plan:
    """Turn a script/directive dict into a :class:`Plan` (unknown keys are ignored)."""
    pace = _num(spec, "pace_ms")
    plan = Plan(
        source=source,
        pace_s=(default_pace_ms if pace is None else pace) / 1000.0,
        ttft_s=(_num(spec, "ttft_ms") or 0.0) / 1000.0,
        error_type=_str(spec, "error_type"),
        message=_str(spec, "message"),
        retry_after=spec.get("retry_after"),
        retry_after_ms=spec.get("retry_after_ms"),
    )
    status = spec.get("status")
    if isinstance(status, int) and status != 200:
        plan.status = status
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
        tool_id = str(entry.get("id") or new_id("toolu_"))
        plan.tool_calls.append(ToolCall(name=str(entry.get("name", "tool")), input_json=input_json, id=tool_id))
    if plan.text is None and not plan.tool_calls:
        plan.text = ""
    plan.stop_reason = "tool_use" if plan.tool_calls else "end_turn"
    if isinstance(spec.get("stop_reason"), str):
        plan.stop_reason = spec["stop_reason"]
    usage = spec.get("usage")
    if isinstance(usage, dict):
        plan.usage_overrides = {k: int(v) for k, v in usage.items() if isinstance(v, (int, float))}
    return plan


# -- reading the request --------------------------------------------------------------------


def last_user_content(body: dict[str, Any]) -> Any:
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return msg.get("content")
    return None


def content_text(content: Any) -> str:
    """String content as it is, or the text of its text blocks joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "\n".join(b["text"] for b in content
                     if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str))


_DECODER = json.JSONDecoder()


def find_directive(text: str) -> dict[str, Any] | None:
    """The first ``#fake{...}`` in ``text`` that is a valid JSON object."""
    i = text.find("#fake{")
    while i >= 0:
        try:
            return _DECODER.raw_decode(text, i + 5)[0]
        except ValueError:
            i = text.find("#fake{", i + 1)
    return None


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
        if not any(ch in _OPS for ch in run.lstrip("-")):
            continue
        if best is None or len(run) > len(best):
            best = run
    return best


def default_plan(body: dict[str, Any], *, pace_ms: float) -> Plan:
    """The deterministic offline model: calculator tool calls, tool-result echo, or a friendly echo."""
    content = last_user_content(body)
    blocks = content if isinstance(content, list) else []
    results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
    text = content_text(content)
    calculator = any(isinstance(t, dict) and t.get("name") == "calculator" for t in body.get("tools") or [])
    if results:
        out = content_text(results[0].get("content"))
        spec: dict[str, Any] = {"text": f"The tool failed: {out}" if results[0].get("is_error")
                                else f"The result is {out}."}
    elif calculator and (expr := find_expression(text)):
        spec = {"tool_use": [{"name": "calculator", "input": {"expression": expr}}]}
    else:
        spec = {"text": OFFLINE_PREFIX + " ".join(text.split())[:200]}
    return plan_from_spec(spec, source="default", default_pace_ms=pace_ms)


# -- token accounting and the prompt-cache simulation ---------------------------------------


def count_input_tokens(body: dict[str, Any]) -> int:
    parts = [body[k] for k in ("system", "tools", "messages") if body.get(k) is not None]
    return max(1, sum(len(json.dumps(p, ensure_ascii=False)) // 4 for p in parts))


def _cache_items(body: dict[str, Any]) -> tuple[list[Any], list[int]]:
    """The prompt in cache order (tools, system, message blocks) without `cache_control`, and
    the indices of the items that carried a breakpoint."""
    items: list[Any] = []
    marks: list[int] = []

    def add(role: str | None, block: Any) -> None:
        if isinstance(block, dict) and "cache_control" in block:
            marks.append(len(items))
            block = {k: v for k, v in block.items() if k != "cache_control"}
        items.append(block if role is None else [role, block])

    for tool in body.get("tools") or []:
        add(None, tool)
    system = body.get("system")
    if isinstance(system, list):
        for block in system:
            add(None, block)
    elif system is not None:
        add(None, system)
    for msg in body.get("messages") or []:
        if isinstance(msg, dict):
            content = msg.get("content")
            for block in content if isinstance(content, list) else [content]:
                add(msg.get("role"), block)
    if body.get("cache_control") and items:  # top-level (automatic) caching: the whole prompt
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
        self._seen.update(keys[m] for m in marks)
        prefix_tokens = max(1, sum(sizes[: max(marks) + 1]) // 4)
        read_tokens = min(prefix_tokens, sum(sizes[:read_end]) // 4)
        return {
            "input_tokens": max(1, total - prefix_tokens),
            "cache_creation_input_tokens": prefix_tokens - read_tokens,
            "cache_read_input_tokens": read_tokens,
        }


# -- encoding -------------------------------------------------------------------------------


def error_body(error_type: str, message: str, request_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_headers(plan: Plan) -> list[tuple[str, str]]:
    headers = [(name, _fmt_num(v)) for name, v in (("retry-after", plan.retry_after),
                                                   ("retry-after-ms", plan.retry_after_ms)) if v is not None]
    if plan.should_retry is not None:
        headers.append(("x-should-retry", "true" if plan.should_retry else "false"))
    return headers


def _fmt_num(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _json_chunks(s: str) -> list[str]:
    """Split tool input JSON into several partial_json deltas, the first one empty (as the API does)."""
    if not s:
        return [""]
    size = max(8, -(-len(s) // 4))
    return [""] + [s[i : i + size] for i in range(0, len(s), size)]


def count_deltas(plan: Plan) -> int:
    return len(plan.text_deltas) + sum(len(_json_chunks(t.input_json)) for t in plan.tool_calls)


def _usage(plan: Plan, usage: dict[str, int], output_tokens: int) -> dict[str, int]:
    """The four usage fields (the prompt's from the cache simulation), with the plan's overrides."""
    prompt = (("input_tokens", 1), ("cache_creation_input_tokens", 0), ("cache_read_input_tokens", 0))
    out = {k: plan.usage_overrides.get(k, usage.get(k, default)) for k, default in prompt}
    out["output_tokens"] = output_tokens
    return out


def _output_tokens(plan: Plan) -> int:
    return plan.usage_overrides.get("output_tokens", max(1, count_deltas(plan)))


def _message(model: str, content: list[Any], stop_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}


def message_json(plan: Plan, *, model: str, usage: dict[str, int]) -> dict[str, Any]:
    """The non-streaming response body."""
    content: list[dict[str, Any]] = [] if plan.text is None else [{"type": "text", "text": plan.text}]
    content += [{"type": "tool_use", "id": t.id, "name": t.name, "input": t.input_value} for t in plan.tool_calls]
    return _message(model, content, plan.stop_reason, _usage(plan, usage, _output_tokens(plan)))


def _event(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


_PING = _event("ping", '{"type":"ping"}')
_MESSAGE_STOP = _event("message_stop", '{"type":"message_stop"}')


# One write: the delay before it, chunk-framed bytes, how many SSE events they hold.
Segment = tuple[float, bytes, int]


def build_stream(plan: Plan, *, model: str, usage: dict[str, int]) -> tuple[list[Segment], str]:
    """Pre-encode the whole SSE stream: its segments and how it ends ("finish", "error" or "drop").

    Structural events (message_start, ping, block start/stop, message_delta,
    message_stop) ride in the same write as their neighbour; each content delta
    starts a new write paced by ``plan.pace_s``. ``error_after``/``drop_after``
    cut the stream after that many text deltas.
    """
    start = {"type": "message_start", "message": _message(model, [], None, _usage(plan, usage, 1))}
    # (paced, bytes, is_text_delta)
    events: list[tuple[bool, bytes, bool]] = [(False, _event("message_start", dumps(start)), False),
                                              (False, _PING, False)]
    # (content block, delta type, delta field, delta values)
    blocks = [({"type": "text", "text": ""}, "text_delta", "text", plan.text_deltas)] if plan.text is not None else []
    blocks += [({"type": "tool_use", "id": t.id, "name": t.name, "input": {}}, "input_json_delta", "partial_json",
                _json_chunks(t.input_json)) for t in plan.tool_calls]
    for index, (block, delta_type, key, values) in enumerate(blocks):
        block_start = {"type": "content_block_start", "index": index, "content_block": block}
        events.append((False, _event("content_block_start", dumps(block_start)), False))
        prefix = f'{{"type":"content_block_delta","index":{index},"delta":{{"type":"{delta_type}","{key}":'
        is_text = delta_type == "text_delta"
        events += [(True, _event("content_block_delta", prefix + encode_basestring(v) + "}}"), is_text)
                   for v in values]
        events.append((False, _event("content_block_stop", f'{{"type":"content_block_stop","index":{index}}}'), False))
    delta = {"type": "message_delta", "delta": {"stop_reason": plan.stop_reason, "stop_sequence": None},
             "usage": {"output_tokens": _output_tokens(plan)}}
    events += [(False, _event("message_delta", dumps(delta)), False), (False, _MESSAGE_STOP, False)]

    outcome = "finish"
    cut_after = plan.error_after if plan.error_after is not None else plan.drop_after
    if cut_after is not None:
        outcome = "error" if plan.error_after is not None else "drop"
        # cut right after the cut_after-th text delta (after the ping for 0 or no text)
        ends = [2] + [i + 1 for i, (_, _, is_text) in enumerate(events) if is_text]
        events = events[: ends[min(cut_after, len(ends) - 1)]]
        if outcome == "error":
            etype, message = plan.cut_error()
            err = {"type": "error", "error": {"type": etype, "message": message}}
            events.append((False, _event("error", dumps(err)), False))

    segments: list[Segment] = []
    buf: list[bytes] = []
    delay = plan.ttft_s
    for paced, data, _ in events:
        if paced and plan.pace_s > 0 and buf:
            segments.append((delay, chunk(b"".join(buf)), len(buf)))
            buf, delay = [], plan.pace_s
        buf.append(data)
    if buf:
        segments.append((delay, chunk(b"".join(buf)), len(buf)))
    return segments, outcome
