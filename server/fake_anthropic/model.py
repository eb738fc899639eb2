"""What the fake answers: scripts, ``#fake{...}`` directives and the default offline model.

Pure (no I/O), so the HTTP layer only writes bytes: :func:`plan_for` resolves a request's
answer into a :class:`Plan`, :func:`build_stream` turns that into ready-to-write, chunk-framed segments.

An answer's content is ``thinking`` (text; signed), ``redacted_thinking`` (any string; sealed), ``text``
(or ``tokens``) and ``tool_use`` calls, in that order — or ``blocks``: the content blocks in their
non-streaming form, streamed as the API streams each kind (``_start``/``_deltas`` on a block replace
its content_block_start block / its deltas). ``stop_reason``, ``stop_sequence``, ``stop_details``,
``container`` and ``usage`` (overriding any usage field) complete it.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from json.encoder import encode_basestring  # C-accelerated: a JSON string literal, no ensure_ascii
from typing import Any

from . import signing
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


# usage fields only message_delta carries (message_start has the prompt's)
DELTA_USAGE = ("output_tokens_details", "server_tool_use")


@dataclass(slots=True)
class Block:
    """One content block: its content_block_start form, its deltas as runs of (delta type, field, values)
    (strings, but a citations_delta's citation objects; delta type "" = raw delta objects written verbatim),
    its form in a non-streaming message, and the output tokens it counts (thinking ones apart)."""

    start: dict[str, Any]
    runs: list[tuple[str, str, list[Any]]]
    final: dict[str, Any]
    tokens: int
    thinking_tokens: int | None = None  # None: not a thinking block


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
    usage: dict[str, Any]  # overrides
    error: tuple[str, str]  # type, message
    error_headers: list[tuple[str, str]]
    error_after: int | None
    drop_after: int | None
    stop_sequence: str | None = None
    stop_extra: dict[str, Any] | None = None  # stop_details / container, as the script gives them

    @property
    def output_tokens(self) -> int:
        return self.usage.get("output_tokens", max(1, sum(b.tokens for b in self.blocks)))

    def usage_details(self) -> dict[str, Any]:
        """The usage fields message_delta carries besides output_tokens: thinking tokens, server tool requests."""
        details: dict[str, Any] = {}
        thinking = [b.thinking_tokens for b in self.blocks if b.thinking_tokens is not None]
        if thinking:
            details["output_tokens_details"] = {"thinking_tokens": sum(thinking)}
        calls = [b.final.get("name") for b in self.blocks if b.final.get("type") == "server_tool_use"]
        if calls:
            details["server_tool_use"] = {"web_search_requests": calls.count("web_search"),
                                          "web_fetch_requests": calls.count("web_fetch")}
        return details | {k: self.usage[k] for k in DELTA_USAGE if k in self.usage}


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


def text_block(text: str, citations: Any = None, final: dict[str, Any] | None = None) -> Block:
    """Streamed as the API does: an empty start (``citations: []`` when it has any), one citations_delta
    per citation, then the text ~1 word per delta."""
    start: dict[str, Any] = {"type": "text", "text": ""}
    runs: list[tuple[str, str, list[Any]]] = []
    if isinstance(citations, list) and citations:
        start["citations"] = []
        runs.append(("citations_delta", "citation", citations))
    words = split_words(text)
    runs.append(("text_delta", "text", words))
    return Block(start, runs, final or {"type": "text", "text": text}, len(words))


def thinking_block(thought: str, omit: bool = False, signature: Any = None) -> Block:
    """Thinking ~1 word per delta (none when the request asked ``display: omitted``: the text is then empty),
    then one signature_delta: the fake's signature unless ``signature`` is given."""
    words = split_words(thought)
    shown = "" if omit else thought
    sig = signature if isinstance(signature, str) else signing.sign(shown, thought)
    runs = [("signature_delta", "signature", [sig])]
    if not omit:
        runs.insert(0, ("thinking_delta", "thinking", words))
    return Block({"type": "thinking", "thinking": "", "signature": ""}, runs,
                 {"type": "thinking", "thinking": shown, "signature": sig}, len(words), len(words))


def redacted_block(opaque: str) -> Block:
    """Complete in its start event: ``data`` seals ``opaque``."""
    block = {"type": "redacted_thinking", "data": signing.seal(opaque)}
    return Block(block, [], block, 1, 1)


def tool_block(block: dict[str, Any]) -> Block:
    """A tool_use / server_tool_use: started with an empty input, then the input JSON in partial_json deltas."""
    kind, raw = block.get("type"), block.get("input", {})
    input_json = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
    head = {"type": kind, "id": str(block.get("id") or new_id("srvtoolu_" if kind == "server_tool_use" else "toolu_")),
            "name": str(block.get("name", "tool"))}
    head |= {k: v for k, v in block.items() if k not in ("type", "id", "name", "input")}
    chunks = _json_chunks(input_json)
    return Block({**head, "input": {}}, [("input_json_delta", "partial_json", chunks)],
                 {**head, "input": _parsed(input_json)}, len(chunks))


def listed_block(entry: dict[str, Any], omit: bool) -> Block:
    """A ``blocks`` entry (a block in its non-streaming form; ``_start``/``_deltas`` replace what is streamed)."""
    block = {k: v for k, v in entry.items() if k not in ("_start", "_deltas")}
    kind = block.get("type")
    if kind == "text":
        text = block.get("text") if isinstance(block.get("text"), str) else ""
        made = text_block(text, block.get("citations"), {**block, "text": text})
    elif kind == "thinking":
        made = thinking_block(str(block.get("thinking", "")), omit, block.get("signature"))
    elif kind == "redacted_thinking":
        made = redacted_block(str(block.get("data", "")))
    elif kind in ("tool_use", "server_tool_use"):
        made = tool_block(block)
    else:  # a server tool's result, or any other block: complete in its start event
        made = Block(block, [], block, 0)
    if isinstance(entry.get("_start"), dict):
        made.start = entry["_start"]
    if isinstance(entry.get("_deltas"), list):
        made.runs = [("", "", entry["_deltas"])]
    return made


def _scripted_blocks(spec: dict[str, Any], omit: bool) -> list[Block]:
    """The blocks of a script without ``blocks``: thinking, redacted thinking, text, tool calls."""
    text, tokens = spec.get("text"), spec.get("tokens")
    if not isinstance(text, str):
        text = " ".join(f"tok{i}" for i in range(tokens)) if isinstance(tokens, int) and tokens >= 0 else None
    blocks: list[Block] = []
    if isinstance(thought := spec.get("thinking"), str):
        blocks.append(thinking_block(thought, omit))
    if isinstance(opaque := spec.get("redacted_thinking"), str):
        blocks.append(redacted_block(opaque))
    tools = [tool_block({"type": "tool_use", "id": entry.get("id"), "name": entry.get("name", "tool"),
                         "input": entry.get("input", {})})
             for entry in spec.get("tool_use") or [] if isinstance(entry, dict)]
    if text is None and not tools and not blocks:
        text = ""
    return [*blocks, *([text_block(text)] if text is not None else []), *tools]


def plan_from_spec(spec: dict[str, Any], source: str, default_pace_ms: float, omit_thinking: bool = False) -> Plan:
    """Turn a script/directive dict into a :class:`Plan` (unknown keys are ignored). ``omit_thinking``:
    the request asked for thinking ``display: omitted``."""
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

    listed = spec.get("blocks")
    blocks = ([listed_block(e, omit_thinking) for e in listed if isinstance(e, dict)] if isinstance(listed, list)
              else _scripted_blocks(spec, omit_thinking))
    stop_reason = spec.get("stop_reason")
    calls = any(b.final.get("type") == "tool_use" for b in blocks)
    usage = spec.get("usage")
    pace, ttft = spec.get("pace_ms"), spec.get("ttft_ms")
    return Plan(
        source=source, status=status,
        pace_s=(pace if _number(pace) else default_pace_ms) / 1000.0,
        ttft_s=(ttft if _number(ttft) else 0.0) / 1000.0,
        blocks=blocks, deltas=sum(len(values) for b in blocks for _, _, values in b.runs),
        stop_reason=stop_reason if isinstance(stop_reason, str) else "tool_use" if calls else "end_turn",
        usage={k: int(v) if _number(v) or isinstance(v, bool) else v for k, v in usage.items()
               if isinstance(v, (int, float, str, dict)) or v is None} if isinstance(usage, dict) else {},
        error=(etype, message), error_headers=headers,
        error_after=_count(spec.get("error_after")), drop_after=_count(spec.get("drop_after")),
        stop_sequence=spec["stop_sequence"] if isinstance(spec.get("stop_sequence"), str) else None,
        stop_extra={k: spec[k] for k in ("stop_details", "container") if k in spec} or None,
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
    deterministic offline model (calculator tool calls, tool-result echo, or a friendly echo; each after a
    short thinking block when the request enables thinking)."""
    thinking = body.get("thinking")
    thinking = thinking if isinstance(thinking, dict) else {}
    omit = thinking.get("display") == "omitted"
    if script is not None:
        return plan_from_spec(script, "script", pace_ms, omit)
    content = next((m.get("content") for m in reversed(body.get("messages") or [])
                    if isinstance(m, dict) and m.get("role") == "user"), None)  # the last user message's
    text = content_text(content)
    if (directive := find_directive(text)) is not None:
        return plan_from_spec(directive, "directive", pace_ms, omit)
    blocks = content if isinstance(content, list) else []
    results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
    calculator = any(isinstance(t, dict) and t.get("name") == "calculator" for t in body.get("tools") or [])
    said = " ".join(text.split())[:200]
    if results:
        out = content_text(results[0].get("content"))
        spec: dict[str, Any] = {"text": f"The tool failed: {out}" if results[0].get("is_error")
                                else f"The result is {out}."}
        thought = f"The tool answered: {' '.join(out.split())[:100]}"
    elif calculator and (expr := find_expression(text)):
        spec = {"tool_use": [{"name": "calculator", "input": {"expression": expr}}]}
        thought = f"The user wrote: {said[:100]}. The calculator can work out {expr}."
    else:
        spec = {"text": OFFLINE_PREFIX + said}
        thought = f"The user wrote: {said[:100]}"
    if thinking.get("type") in ("enabled", "adaptive"):
        spec["thinking"] = thought
    return plan_from_spec(spec, "default", pace_ms, omit)


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
    prompt = {k: plan.usage.get(k, v) for k, v in usage.items()}
    if plan.usage.keys() - usage.keys():  # the script's other usage fields, but those message_delta carries
        prompt |= {k: v for k, v in plan.usage.items() if k not in usage and k not in ("output_tokens", *DELTA_USAGE)}
    message = {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model,
               "content": [] if streaming else [b.final for b in plan.blocks],
               "stop_reason": None if streaming else plan.stop_reason,
               "stop_sequence": None if streaming else plan.stop_sequence,
               "usage": prompt | ({"output_tokens": 1} if streaming
                                  else {"output_tokens": plan.output_tokens, **plan.usage_details()})}
    if plan.stop_extra and not streaming:
        message |= plan.stop_extra
    return message


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
    for index, block in enumerate(plan.blocks):
        block_start = {"type": "content_block_start", "index": index, "content_block": block.start}
        events.append((False, _event("content_block_start", dumps(block_start)), False))
        for delta_type, key, values in block.runs:
            if not delta_type:  # raw delta objects
                prefix = f'{{"type":"content_block_delta","index":{index},"delta":'
                events += [(True, _event("content_block_delta", prefix + dumps(v) + "}"),
                            isinstance(v, dict) and v.get("type") == "text_delta") for v in values]
                continue
            prefix = f'{{"type":"content_block_delta","index":{index},"delta":{{"type":"{delta_type}","{key}":'
            is_text = delta_type == "text_delta"
            encode = dumps if delta_type == "citations_delta" else encode_basestring
            events += [(True, _event("content_block_delta", prefix + encode(v) + "}}"), is_text) for v in values]
        events.append((False, _event("content_block_stop", f'{{"type":"content_block_stop","index":{index}}}'), False))
    delta = {"type": "message_delta", "delta": {"stop_reason": plan.stop_reason, "stop_sequence": plan.stop_sequence,
                                                **(plan.stop_extra or {})},
             "usage": {"output_tokens": plan.output_tokens, **plan.usage_details()}}
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
