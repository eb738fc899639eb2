"""What the fake answers: scripts, ``#fake{...}`` directives and the default offline model.

Pure (no I/O), so the HTTP layer only writes bytes: :func:`plan_for` resolves a request's
answer into a :class:`Plan`, :func:`build_stream` turns that into ready-to-write, chunk-framed segments.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
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
# script key -> the error answer's header it sets (numbers as integers when they are whole)
ERROR_HEADERS = {"retry_after": "retry-after", "retry_after_ms": "retry-after-ms"}

OFFLINE_PREFIX = "This is the offline model (no ANTHROPIC_API_KEY is set). You said: "


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def error_body(error_type: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


# One content block: its content_block_start form, delta type, delta field, delta values, and
# its form in a non-streaming message.
Block = tuple[dict[str, Any], str, str, list[str], dict[str, Any]]


@dataclass
class Plan:
    """A resolved answer. ``status`` != 200 means an HTTP ``error`` (with ``error_headers``) before
    any stream; ``error_after``/``drop_after`` cut the answer after that many text deltas."""

    source: str  # "script" | "directive" | "default"
    status: int
    pace_s: float
    ttft_s: float
    blocks: list[Block]
    deltas: int
    stop_reason: str
    usage: dict[str, int]  # overrides
    error: tuple[str, str]  # type, message
    error_headers: list[tuple[str, str]]
    error_after: int | None
    drop_after: int | None

    @property
    def output_tokens(self) -> int:
        return self.usage.get("output_tokens", max(1, self.deltas))


def split_words(text: str) -> list[str]:
    """~1 word per delta, whitespace kept, so ``"".join(split_words(t)) == t``."""
    return re.findall(r"\s*\S+\s*|\s+", text) if text else []


def _json_chunks(s: str) -> list[str]:
    """Split tool input JSON into several partial_json deltas, the first one empty (as the API does)."""
    size = max(8, -(-len(s) // 4))
    return [""] + [s[i : i + size] for i in range(0, len(s), size)]


def _parsed(s: str) -> Any:
    """Tool input for a non-streaming body: the parsed JSON, or the raw string if it is not valid JSON."""
    try:
        return json.loads(s)
    except ValueError:
        return s


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _string(spec: dict[str, Any], key: str, default: str) -> str:
    v = spec.get(key)
    return v if isinstance(v, str) and v else default


def plan_from_spec(spec: dict[str, Any], source: str, default_pace_ms: float) -> Plan:
    """Turn a script/directive dict into a :class:`Plan` (unknown keys are ignored)."""
    status = spec.get("status")
    status = status if isinstance(status, int) else 200
    if status == 200:  # the error of an error_after cut
        etype, message = _string(spec, "error_type", "overloaded_error"), _string(spec, "message", "Overloaded")
    else:
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        etype = _string(spec, "error_type", ERRORS[status][0] if status in ERRORS else fallback)
        message = _string(spec, "message", DEFAULT_ERROR_MESSAGES.get(etype, f"Error {status}"))
    headers = [(name, str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
               for key, name in ERROR_HEADERS.items() if (v := spec.get(key)) is not None]
    if isinstance(spec.get("should_retry"), bool):
        headers.append(("x-should-retry", "true" if spec["should_retry"] else "false"))

    text, tokens = spec.get("text"), spec.get("tokens")
    if not isinstance(text, str):
        text = " ".join(f"tok{i}" for i in range(tokens)) if isinstance(tokens, int) and tokens >= 0 else None
    tools: list[Block] = []
    for entry in spec.get("tool_use") or []:
        if isinstance(entry, dict):
            raw = entry.get("input", {})
            input_json = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
            call = {"type": "tool_use", "id": str(entry.get("id") or new_id("toolu_")),
                    "name": str(entry.get("name", "tool"))}
            tools.append(({**call, "input": {}}, "input_json_delta", "partial_json", _json_chunks(input_json),
                          {**call, "input": _parsed(input_json)}))
    if text is None and not tools:
        text = ""
    blocks = tools if text is None else [({"type": "text", "text": ""}, "text_delta", "text", split_words(text),
                                          {"type": "text", "text": text}), *tools]
    stop_reason = spec.get("stop_reason")
    usage = spec.get("usage")
    pace, ttft = spec.get("pace_ms"), spec.get("ttft_ms")
    return Plan(
        source=source, status=status,
        pace_s=(pace if _number(pace) else default_pace_ms) / 1000.0,
        ttft_s=(ttft if _number(ttft) else 0.0) / 1000.0,
        blocks=blocks, deltas=sum(len(b[3]) for b in blocks),
        stop_reason=stop_reason if isinstance(stop_reason, str) else "tool_use" if tools else "end_turn",
        usage={k: int(v) for k, v in usage.items() if isinstance(v, (int, float))} if isinstance(usage, dict) else {},
        error=(etype, message), error_headers=headers,
        error_after=_count(spec.get("error_after")), drop_after=_count(spec.get("drop_after")),
    )


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


def find_expression(text: str) -> str | None:
    """The longest arithmetic-looking run in ``text`` with a digit and an operator, tidied up."""
    found: list[str] = []
    for m in _EXPR_RUN.finditer(text):
        run = re.sub(r"[^0-9)%]+$", "", re.sub(r"^[^0-9(.\-]+", "", m.group(0)))
        # drop unmatched outer parentheses ("(what is 2+3)" -> "2+3")
        while run.count("(") > run.count(")") and run.startswith("("):
            run = run[1:].strip()
        while run.count(")") > run.count("(") and run.endswith(")"):
            run = run[:-1].strip()
        if any(ch.isdigit() for ch in run) and any(ch in "+-*/^%" for ch in run.lstrip("-")):
            found.append(run)
    return max(found, key=len, default=None)  # the first of the longest


def plan_for(body: dict[str, Any], script: dict[str, Any] | None, pace_ms: float) -> Plan:
    """The answer to a request: the next script, else a directive in the last user message, else the
    deterministic offline model (calculator tool calls, tool-result echo, or a friendly echo)."""
    if script is not None:
        return plan_from_spec(script, "script", pace_ms)
    content = next((m.get("content") for m in reversed(body.get("messages") or [])
                    if isinstance(m, dict) and m.get("role") == "user"), None)  # the last user message's
    text = content_text(content)
    if (directive := find_directive(text)) is not None:
        return plan_from_spec(directive, "directive", pace_ms)
    blocks = content if isinstance(content, list) else []
    results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
    calculator = any(isinstance(t, dict) and t.get("name") == "calculator" for t in body.get("tools") or [])
    if results:
        out = content_text(results[0].get("content"))
        spec: dict[str, Any] = {"text": f"The tool failed: {out}" if results[0].get("is_error")
                                else f"The result is {out}."}
    elif calculator and (expr := find_expression(text)):
        spec = {"tool_use": [{"name": "calculator", "input": {"expression": expr}}]}
    else:
        spec = {"text": OFFLINE_PREFIX + " ".join(text.split())[:200]}
    return plan_from_spec(spec, "default", pace_ms)


def count_input_tokens(body: dict[str, Any]) -> int:
    parts = [body[k] for k in ("system", "tools", "messages") if body.get(k) is not None]
    return max(1, sum(len(json.dumps(p, ensure_ascii=False)) // 4 for p in parts))


def cache_usage(seen: set[str], body: dict[str, Any]) -> dict[str, int]:
    """The prompt's usage fields, like the API's cache: each breakpoint writes its prefix (into ``seen``);
    a request reads the longest prefix written before that ends at a block boundary up to 20 blocks
    before one of its breakpoints (so a rolling breakpoint on the latest message reads the previous turn's)."""
    system = body.get("system")
    system = system if isinstance(system, list) else [] if system is None else [system]
    blocks: list[tuple[Any, Any]] = [(None, b) for b in [*(body.get("tools") or []), *system]]  # (role, block)
    for msg in body.get("messages") or []:
        if isinstance(msg, dict):
            content = msg.get("content")
            blocks += [(msg.get("role"), b) for b in (content if isinstance(content, list) else [content])]
    items: list[Any] = []
    marks: list[int] = []
    for role, block in blocks:
        if isinstance(block, dict) and "cache_control" in block:
            marks.append(len(items))
            block = {k: v for k, v in block.items() if k != "cache_control"}
        items.append(block if role is None else [role, block])
    if body.get("cache_control") and items:  # top-level (automatic) caching: the whole prompt
        marks.append(len(items) - 1)
    total = count_input_tokens(body)
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
        for j in range(mark, max(-1, mark - 20), -1):
            if keys[j] in seen:
                read_end = max(read_end, j + 1)
                break
    seen.update(keys[m] for m in marks)
    prefix_tokens = max(1, sum(sizes[: max(marks) + 1]) // 4)
    read_tokens = min(prefix_tokens, sum(sizes[:read_end]) // 4)
    return {"input_tokens": max(1, total - prefix_tokens), "cache_creation_input_tokens": prefix_tokens - read_tokens,
            "cache_read_input_tokens": read_tokens}


def message_json(plan: Plan, model: str, usage: dict[str, int], *, streaming: bool = False) -> dict[str, Any]:
    """The non-streaming response body, or (``streaming``) the empty message that message_start carries."""
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model,
            "content": [] if streaming else [b[4] for b in plan.blocks],
            "stop_reason": None if streaming else plan.stop_reason, "stop_sequence": None,
            "usage": {k: plan.usage.get(k, v) for k, v in usage.items()}
            | {"output_tokens": 1 if streaming else plan.output_tokens}}


def _event(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


_PING = _event("ping", '{"type":"ping"}')
_MESSAGE_STOP = _event("message_stop", '{"type":"message_stop"}')


# One write: the delay before it, chunk-framed bytes, how many SSE events they hold.
Segment = tuple[float, bytes, int]


def build_stream(plan: Plan, model: str, usage: dict[str, int]) -> tuple[list[Segment], bool]:
    """Pre-encode the whole SSE stream: its segments, and whether it ends in a dropped connection.

    Structural events (message_start, ping, block start/stop, message_delta,
    message_stop) ride in the same write as their neighbour; each content delta
    starts a new write paced by ``plan.pace_s``. ``error_after``/``drop_after``
    cut the stream after that many text deltas (an error event ends the former).
    """
    start = {"type": "message_start", "message": message_json(plan, model, usage, streaming=True)}
    # (paced, bytes, is_text_delta)
    events: list[tuple[bool, bytes, bool]] = [(False, _event("message_start", dumps(start)), False),
                                              (False, _PING, False)]
    for index, (block, delta_type, key, values, _) in enumerate(plan.blocks):
        block_start = {"type": "content_block_start", "index": index, "content_block": block}
        events.append((False, _event("content_block_start", dumps(block_start)), False))
        prefix = f'{{"type":"content_block_delta","index":{index},"delta":{{"type":"{delta_type}","{key}":'
        is_text = delta_type == "text_delta"
        events += [(True, _event("content_block_delta", prefix + encode_basestring(v) + "}}"), is_text)
                   for v in values]
        events.append((False, _event("content_block_stop", f'{{"type":"content_block_stop","index":{index}}}'), False))
    delta = {"type": "message_delta", "delta": {"stop_reason": plan.stop_reason, "stop_sequence": None},
             "usage": {"output_tokens": plan.output_tokens}}
    events += [(False, _event("message_delta", dumps(delta)), False), (False, _MESSAGE_STOP, False)]

    cut_after = plan.error_after if plan.error_after is not None else plan.drop_after
    drop = plan.error_after is None and plan.drop_after is not None
    if cut_after is not None:
        # cut right after the cut_after-th text delta (after the ping for 0 or no text)
        ends = [2] + [i + 1 for i, (_, _, is_text) in enumerate(events) if is_text]
        events = events[: ends[min(cut_after, len(ends) - 1)]]
        if not drop:
            events.append((False, _event("error", dumps(error_body(*plan.error))), False))

    segments: list[Segment] = []
    buf: list[bytes] = []
    delay = plan.ttft_s
    for paced, data, _ in events:
        if paced and plan.pace_s > 0 and buf:
            segments.append((delay, chunk(b"".join(buf)), len(buf)))
            buf, delay = [], plan.pace_s
        buf.append(data)
    # the last write ends the chunked body with the empty chunk, unless the connection is to drop
    segments.append((delay, chunk(b"".join(buf)) + (b"" if drop else chunk(b"")), len(buf)))
    return segments, drop
