"""Bounded fuzzing (hypothesis) of every route and both WebSockets of a real 2-worker server.

HTTP: every route of server/app.py (and unknown ones) with garbage methods, paths, headers and
bodies, plus valid turn and `useChat` bodies mutated one field at a time: wrong types (lists,
objects, numbers, bools, null, huge integers, floats, NaN/Infinity), lone surrogates (raw
JSON text with `\\ud800` escapes), nesting 950-5000 deep, dropped and unknown fields, and
byte-level damage. WebSockets: the same for frames of `/agent/ws` and `/api/chat/ws`.

Asserted: no 5xx, every error is our JSON shape, a body known to be bad (one field of a wrong
type, a lone surrogate, nesting too deep) is a 4xx; every bad WebSocket frame is answered
(an `error` frame with a stable code on /agent/ws; one naming its `requestId` on
/api/chat/ws, when it has a usable one) and the socket stays open and answers the next frame
(`ping` -> `pong`; a `resume` probe -> `no-active`); no worker crashed, nothing was logged at
error level, no traceback ("Exception in ASGI application") in the server log, nothing stored
for invalid requests, and the server answers normally afterwards.

The one 5xx a valid request may get is `502 structured_output_invalid` when it carries a
`response_schema`: the offline model answers prose, which matches no schema (the model's
failure, reported as documented, not the server's).

The default budget fits the suite (~1 min); `scripts/fuzz` runs the same tests longer
(FUZZ_EXAMPLES HTTP requests, FUZZ_WS_EXAMPLES WebSocket sessions of up to 6 frames per socket).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import string
from collections import Counter
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
import redis
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .harness import Server, server_env

HTTP_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2500"))
WS_EXAMPLES = int(os.environ.get("FUZZ_WS_EXAMPLES", "250"))
KEYS = ["fuzz-key-" + secrets.token_hex(12), "fuzz-key-" + secrets.token_hex(12)]  # two principals
PRINCIPALS = ["key:" + hashlib.sha256(k.encode()).hexdigest()[:12] for k in KEYS]
MAX_BODY = 16_384
MAX_FRAME = 16_384  # deep nesting up to 5000 levels fits a frame; a bigger frame is closed with 1009
TURN_PATHS = {"/agent", "/agent/stream", "/api/chat"}
FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)
SERVER_ERROR_MARKERS = ("Traceback", "Exception in ASGI application", "unhandled error", '"level": "error"')


# -- raw JSON text ---------------------------------------------------------------------------
class Raw:
    """A JSON fragment written as is (deep nesting, huge or non-finite numbers)."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:24]!r}...{len(self.text)} chars)"


def dump(value: Any) -> str:
    """JSON text; `json.dumps` escapes a lone surrogate as `\\udXXX` (ensure_ascii), which is
    how a client sends one. NaN and Infinity come out as such (json.loads reads them)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dump(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def deep(levels: int, kind: str) -> str:
    if kind == "list":
        return "[" * levels + "]" * levels
    if kind == "object":
        levels = min(levels, 2500)  # 6 bytes a level: stay under the body limit
        return '{"a":' * levels + "1" + "}" * levels
    levels = min(levels, 1900)
    return '[{"a":' * levels + "0" + "}]" * levels


def kind_of(value: Any) -> str:
    """What the server sees after json.loads, for the bad-input oracle."""
    if isinstance(value, Raw):
        text = value.text
        if text[0] in "[{":
            return "deep"  # too deep for the parser: invalid_json
        if text.isdigit():
            return "badnum" if len(text) > 4300 else "int+"  # past int's 4300-digit limit: invalid_json
        return "float"  # NaN, Infinity, 1e999, ...
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int+" if value >= 1 else "int0" if value == 0 else "int-"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "surrogate" if any(0xD800 <= ord(c) <= 0xDFFF for c in value) else "str"
    return "list" if isinstance(value, list) else "dict"


# The kinds a field may legitimately hold (or might, for a random list or object): a value of
# any other kind makes the request a 4xx. A lone surrogate is never valid text.
TURN_OK = {
    "message": {"str", "list"}, "session_id": {"null", "str"}, "system": {"null", "str"}, "model": {"str"},
    "max_tokens": {"int+"}, "message_id": {"null", "str"}, "on_busy": {"str"},
    "cancel_on_disconnect": {"bool"}, "response_schema": {"null", "dict"},
}
PASSED_THROUGH = ("model", "max_tokens", "system", "on_busy", "cancel_on_disconnect")
CHAT_OK = {"id": {"str"}, "messages": {"list"}, "trigger": {"null", "str"}, "messageId": {"null", "str"},
           **{k: TURN_OK[k] for k in PASSED_THROUGH}}


def known_bad(field: str, value: Any, ok: dict[str, set[str]]) -> bool:
    return kind_of(value) not in ok[field]


# -- strategies ------------------------------------------------------------------------------
SURROGATE = st.characters(categories=["Cs"])
SURROGATE_TEXT = st.builds(lambda a, s, b: a + s + b, st.text(max_size=8), SURROGATE, st.text(max_size=8))
DEEP = st.builds(lambda n, k: Raw(deep(n, k)), st.integers(950, 5000), st.sampled_from(["list", "object", "mixed"]))
ODD_NUMBER = st.one_of(
    st.integers(20, 6000).map(lambda n: Raw("9" * n)),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "-0.0", "1.5"]).map(Raw),
)
HUGE_INT = st.integers(min_value=2**63, max_value=10**300) | st.integers(min_value=-(10**300), max_value=-(2**63))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40) | SURROGATE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
WRONG = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE_INT, st.floats(allow_nan=True, allow_infinity=True),
    SURROGATE_TEXT, st.lists(JSON, max_size=3), st.dictionaries(st.text(max_size=12), JSON, max_size=3),
    DEEP, ODD_NUMBER,
)
WORD = st.text(string.ascii_letters + string.digits, min_size=1, max_size=12)
SID = st.one_of(st.just("A" * 22), st.text(string.ascii_letters + string.digits + "-_", min_size=16, max_size=64),
                st.text(min_size=0, max_size=80), SURROGATE_TEXT)
MESSAGE_ID = st.text(string.ascii_letters + string.digits + "._:-", min_size=1, max_size=40)
TURN_BASE = st.fixed_dictionaries(
    {"message": WORD.map(lambda w: "fuzz " + w)},
    optional={"max_tokens": st.integers(1, 200), "on_busy": st.sampled_from(["reject", "interrupt"]),
              "cancel_on_disconnect": st.booleans(), "message_id": MESSAGE_ID, "system": st.just("Be brief."),
              "model": st.just("claude-sonnet-4-5")},
)


CHAT_BASE = st.builds(
    lambda w, extra: {"id": "fuzz-chat-" + w, "trigger": "submit-message",
                      "messages": [{"id": "m-" + w, "role": "user", "parts": [{"type": "text", "text": "fuzz " + w}]}],
                      **extra},
    WORD, st.fixed_dictionaries({}, optional={"max_tokens": st.integers(1, 200), "cancel_on_disconnect": st.booleans()}),
)
B64 = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=40)
BLOCK = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=50) | WRONG}),
    st.fixed_dictionaries({"type": st.just("image"), "source": st.fixed_dictionaries({
        "type": st.sampled_from(["base64", "url", "file"]) | WRONG,
        "media_type": st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp", "text/html"]) | WRONG,
        "data": B64 | WRONG, "url": st.text(max_size=40).map(lambda t: "https://x.example/" + t) | WRONG})}),
    JSON,
)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40) | WRONG}),
    st.fixed_dictionaries({"type": st.just("file"), "mediaType": st.sampled_from(["image/png", "text/plain"]) | WRONG,
                           "url": st.sampled_from(["data:image/png;base64,AAAA", "https://x.example/a.png",
                                                   "data:x"]) | SURROGATE_TEXT | WRONG}),
    JSON,
)
# Random values per field, for bodies with no valid base (only "no 5xx" is asserted for them).
FIELD_VALUES = {
    "message": st.text(max_size=200) | st.lists(BLOCK, max_size=3) | WRONG,
    "session_id": SID | WRONG,
    "model": st.sampled_from(["claude-sonnet-4-5", "claude-haiku-4-5", "gpt-4o", ""]) | WRONG,
    "max_tokens": st.integers(-5, 10**9) | WRONG,
    "system": st.text(max_size=60) | WRONG,
    "message_id": st.text(max_size=140) | WRONG,
    "on_busy": st.sampled_from(["reject", "interrupt", "queue"]) | WRONG,
    "cancel_on_disconnect": st.booleans() | WRONG,
    "response_schema": st.sampled_from([{"type": 5}, {"type": "object", "properties": 3}]) | WRONG,
    "id": SID | WRONG, "trigger": st.sampled_from(["submit-message", "regenerate-message"]) | WRONG,
    "messageId": st.none() | WRONG,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]) | WRONG,
                                                "parts": st.lists(PART, max_size=2) | WRONG}), max_size=2) | WRONG,
}
RANDOM_BODY = st.fixed_dictionaries({}, optional=FIELD_VALUES)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]], ok: dict[str, set[str]],
            required: tuple[str, ...]) -> tuple[str, bool, str]:
    """A valid body, damaged once: (JSON text, known to be bad, what was done)."""
    body = dict(draw(base))
    how = draw(st.sampled_from(["wrong", "wrong", "wrong", "drop", "unknown", "bytes"]))
    if how == "wrong":
        field = draw(st.sampled_from(sorted(ok)))
        body[field] = value = draw(WRONG)
        return dump(body), known_bad(field, value, ok), f"{field}={kind_of(value)}"
    if how == "drop":
        field = draw(st.sampled_from(sorted(body)))
        del body[field]
        return dump(body), field in required, f"drop {field}"
    if how == "unknown":
        body[draw(st.text(max_size=12).filter(lambda k: k not in ok))] = draw(WRONG | JSON)
        return dump(body), False, "unknown field"
    raw = bytearray(dump(body).encode())
    for _ in range(draw(st.integers(1, 4))):
        op, at = draw(st.sampled_from(["flip", "insert", "delete", "truncate"])), draw(st.integers(0, len(raw)))
        if op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del raw[at:at + draw(st.integers(1, 4))]
        elif op == "truncate":
            del raw[at:]
        elif at < len(raw):
            raw[at] ^= 1 << draw(st.integers(0, 7))
    return raw.decode("latin-1"), False, "bytes"  # latin-1 only carries the bytes through


# Every route of server/app.py (GET and DELETE /sessions/{id} through METHOD), and the
# WebSocket paths over plain HTTP.
KNOWN_PATHS = ["/agent", "/agent/stream", "/agent/ws", "/sessions/{}", "/sessions/{}/stream", "/sessions/{}/cancel",
               "/ws-ticket", "/api/chat", "/api/chat/ws", "/api/chat/{}/stream", "/health", "/ready", "/metrics",
               "/openapi.json", "/"]
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80).map(str.strip)  # h11 rules
AUTH = st.one_of(st.sampled_from([f"Bearer {KEYS[0]}", f"Bearer {KEYS[1]}"]), HEADER_TEXT, st.none())
HEADERS = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=x", ""]),
    "origin": st.sampled_from(["https://evil.example", "null", "", "https://app.example"]) | HEADER_TEXT,
    "last-event-id": HEADER_TEXT | st.binary(max_size=20).map(lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F)),
    "accept": st.sampled_from(["text/event-stream", "*/*"]) | HEADER_TEXT,
    "x-forwarded-for": HEADER_TEXT,
})
GARBAGE_BODY = st.one_of(
    RANDOM_BODY.map(dump),
    JSON.map(dump),
    WRONG.map(dump),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.text(max_size=300, alphabet=st.characters(codec=None) | SURROGATE).map(
        lambda t: t.encode("utf-8", "surrogatepass").decode("latin-1")),  # raw encoded surrogates
    st.just("{" * 2000), st.just('{"message": "' + "x" * (MAX_BODY + 10) + '"}'),
)
METHOD = st.sampled_from(["GET", "POST", "POST", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"])


@st.composite
def http_case(draw: st.DrawFn, sids: list[str]) -> dict[str, Any]:
    """One request: a mutated turn or chat body (with an oracle), or garbage anywhere."""
    family = draw(st.sampled_from(["turn", "turn", "chat", "garbage", "garbage", "garbage"]))
    auth = {"authorization": f"Bearer {draw(st.sampled_from(KEYS))}", "content-type": "application/json"}
    if family == "turn":
        text, bad, what = draw(mutated(TURN_BASE, TURN_OK, ("message",)))
        return dict(method="POST", path=draw(st.sampled_from(["/agent", "/agent/stream"])), headers=auth,
                    body=text, bad=bad, what=what)
    if family == "chat":
        text, bad, what = draw(mutated(CHAT_BASE, CHAT_OK, ("id", "messages")))
        return dict(method="POST", path="/api/chat", headers=auth, body=text, bad=bad, what=what)
    sid = draw(st.sampled_from(sids) | SID)
    path = draw(st.one_of(
        st.sampled_from(KNOWN_PATHS).map(lambda p: p.format(quote(sid, safe="", errors="surrogatepass"))),
        st.text(max_size=60).map(lambda t: "/" + quote(t, safe="/")),
    ))
    query = draw(st.dictionaries(st.sampled_from(["last_event_id", "ticket", "session_id", "x"]),
                                 st.text(max_size=30), max_size=2))
    if query:
        path += "?" + urlencode(query)
    headers = draw(HEADERS)
    auth_header = draw(AUTH)
    if auth_header is not None:
        headers = {**headers, "authorization": auth_header}
    return dict(method=draw(METHOD), path=path, headers=headers, body=draw(GARBAGE_BODY), bad=False, what="garbage")


# -- fixtures and checks ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_server(fake, redis_url):
    env = server_env(fake, redis_url, WEB_CONCURRENCY=2, AGENT_API_KEYS=",".join(KEYS), RATE_LIMIT_RPM=0,
                     RATE_LIMIT_TPM=0, MAX_CONCURRENT_STREAMS_PER_PRINCIPAL=0, MAX_BODY_BYTES=MAX_BODY,
                     MAX_WS_FRAME_BYTES=MAX_FRAME, LOG_LEVEL="INFO", HEARTBEAT_SECONDS=2,
                     ALLOWED_ORIGINS="https://app.example")
    server = Server(env, name="fuzz").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sessions(fuzz_server) -> list[str]:
    """One real session per principal, so the session routes also meet ids that exist (and
    ids of the other principal)."""
    sids = []
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        for key in KEYS:
            r = client.post("/agent", json={"message": "hello"}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            sids.append(r.json()["session_id"])
    return sids


def owned_sessions(redis_url: str) -> int:
    r = redis.Redis.from_url(redis_url)
    owners = {p.encode() for p in PRINCIPALS}
    return sum(1 for key in r.scan_iter(match="agent:{*}:meta", count=1000) if r.hget(key, "owner") in owners)


def assert_healthy(server: Server, pids: list[int]) -> None:
    assert server.worker_pids() == pids, "a worker crashed and was replaced"
    log = server.log_path.read_text(errors="replace")
    for marker in SERVER_ERROR_MARKERS:
        assert marker not in log, f"{marker!r} in the server log:\n{log[-3000:]}"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/ready").status_code == 200
        r = client.post("/agent", json={"message": "still fine?"}, headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert r.status_code == 200 and r.json()["text"], r.text


def is_schema_answer(case: dict[str, Any], r: httpx.Response) -> bool:
    """The documented 502 for a model answer that matches no `response_schema` (see above)."""
    return (r.status_code == 502 and '"response_schema"' in case["body"]
            and r.headers.get("content-type", "").startswith("application/json")
            and r.json().get("error", {}).get("code") == "structured_output_invalid")


def check_response(case: dict[str, Any], r: httpx.Response) -> None:
    where = f"{case['method']} {case['path'][:80]} ({case['what']})"
    assert r.status_code < 500 or is_schema_answer(case, r), f"{where} -> {r.status_code}: {r.text[:500]}"
    if case["bad"]:
        assert 400 <= r.status_code < 500, f"{where}: a bad body got {r.status_code}: {r.text[:300]}"
    if r.status_code >= 400 and case["method"] != "HEAD":
        error = r.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str), r.text
        assert isinstance(error["retryable"], bool)
        if 400 <= r.status_code < 500 and r.status_code not in (409, 429):
            assert error["retryable"] is False, r.text


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n{line}")


def test_fuzz_http(fuzz_server, sessions, upstream, redis_url, capsys):
    pids = fuzz_server.worker_pids()
    before = owned_sessions(redis_url)
    turns_ok = 0
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()

    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:

        @settings(max_examples=HTTP_EXAMPLES, **FUZZ_SETTINGS)
        @given(case=http_case(sessions))
        def one(case):
            nonlocal turns_ok
            content = case["body"].encode("latin-1", "replace") if case["what"] in ("bytes", "garbage") \
                else case["body"].encode()
            if case["method"] in ("GET", "HEAD", "OPTIONS"):
                content = None
            r = client.request(case["method"], case["path"], headers=case["headers"], content=content)
            sent["bad" if case["bad"] else case["what"] if case["what"] == "garbage" else "mutated"] += 1
            statuses[r.status_code] += 1
            check_response(case, r)
            sent["schema answers"] += is_schema_answer(case, r)
            if case["method"] == "POST" and case["path"].split("?")[0] in TURN_PATHS and r.status_code < 300:
                turns_ok += 1

        one()

    assert owned_sessions(redis_url) - before <= turns_ok, "an invalid request stored a session"
    assert_healthy(fuzz_server, pids)
    total = sent["bad"] + sent["mutated"] + sent["garbage"]
    server_errors = sum(n for s, n in statuses.items() if s >= 500) - sent["schema answers"]
    report(capsys, f"fuzz http: {total} requests ({sent['bad']} known-bad bodies, all 4xx; {sent['mutated']} "
                   f"other mutated bodies; {sent['garbage']} garbage requests on any route); server errors: "
                   f"{server_errors} (plus {sent['schema answers']} documented 502 structured_output_invalid); "
                   f"statuses: {dict(sorted(statuses.items()))}")


# -- WebSockets ----------------------------------------------------------------------------------
AGENT_TYPES = ["message", "cancel", "resume", "ping", "pong"]


@st.composite
def agent_frame(draw: st.DrawFn) -> tuple[str | bytes, bool]:
    """(frame, known to be bad: must be answered with an `error` frame)."""
    family = draw(st.sampled_from(["message", "message", "resume", "simple", "type", "garbage"]))
    if family == "message":
        text, bad, _ = draw(mutated(TURN_BASE, TURN_OK, ("message",)))
        if text.startswith("{"):
            text = '{"type":"message",' + text[1:] if text != "{}" else '{"type":"message"}'
        return text, bad
    if family == "resume":
        frame: dict[str, Any] = {"type": "resume"}
        bad = False
        if draw(st.booleans()):
            frame["last_event_id"] = value = draw(WRONG | st.text(max_size=40))
            bad = kind_of(value) not in ("null", "str", "surrogate")  # any string: resume from the start
        if draw(st.booleans()):
            frame["session_id"] = value = draw(WRONG)
            bad = True  # never a valid id
        return dump(frame), bad
    if family == "simple":
        return dump({"type": draw(st.sampled_from(["ping", "pong", "cancel"]))}), False
    if family == "type":
        value = draw(WRONG | st.text(max_size=12).filter(lambda t: t not in AGENT_TYPES))
        extra = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), JSON, max_size=2))
        return dump({"type": value, **extra}), True
    garbage = draw(st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).filter(lambda t: not t.lstrip().startswith("{")),
        WRONG.map(dump).filter(lambda t: not t.startswith("{")),
        DEEP.map(dump),
        st.just("x" * (MAX_FRAME + 100)),
    ))
    return garbage, True


@st.composite
def chat_frame(draw: st.DrawFn) -> tuple[str | bytes, str | None, bool]:
    """(frame, its usable requestId or None, known to be bad: must be answered with an error)."""
    family = draw(st.sampled_from(["send", "send", "resume", "abort", "type", "garbage"]))
    request_id = draw(st.sampled_from(["r1", "r2", "r3"]) | WORD | WRONG | st.text(max_size=30))
    usable = (isinstance(request_id, str) and 0 < len(request_id) <= 200 and kind_of(request_id) == "str")
    if family == "send":
        base = draw(CHAT_BASE)
        frame: dict[str, Any] = {"type": "send", "requestId": request_id, "headers": {},
                                 "body": {k: base.pop(k) for k in PASSED_THROUGH if k in base}, **base}
        field = draw(st.sampled_from(sorted(CHAT_OK)))
        value = draw(WRONG)
        if field in PASSED_THROUGH:
            frame["body"][field] = value
        else:
            frame[field] = value
        bad = known_bad(field, value, CHAT_OK)
    elif family == "resume":
        frame = {"type": "resume", "requestId": request_id, "id": "fuzz-chat-" + draw(WORD)}
        field = draw(st.sampled_from(["id", "lastSequence"]))
        frame[field] = value = draw(WRONG)
        bad = kind_of(value) not in ({"str"} if field == "id" else {"null", "int+", "int0"})
    elif family == "abort":
        frame, bad = {"type": "abort", "requestId": request_id}, False
    elif family == "type":
        frame = {"type": draw(WRONG | st.text(max_size=12).filter(lambda t: t not in ("send", "resume", "abort"))),
                 "requestId": request_id}
        bad = True
    else:
        raw = draw(st.one_of(st.binary(max_size=200), st.text(max_size=200), DEEP.map(dump),
                             st.just("x" * (MAX_FRAME + 100))))
        return raw, None, False
    if any(kind_of(v) in ("deep", "badnum") for v in (*frame.values(), *frame.get("body", {}).values())):
        return dump(frame), None, False  # the frame cannot be read, so it has no requestId to answer
    return dump(frame), request_id if usable else None, bad and usable


async def open_ws(url: str) -> Any:
    try:
        return await websockets.connect(url, additional_headers={"Authorization": f"Bearer {KEYS[0]}"},
                                        max_size=None, open_timeout=10)
    except InvalidStatus as exc:
        assert exc.response.status_code < 500, exc.response.status_code
        return None


def closed_as_expected(exc: ConnectionClosed, frames: list[Any]) -> None:
    code = exc.rcvd.code if exc.rcvd else None
    oversized = any(len(f) > MAX_FRAME for f in frames)
    # After a too-big frame the server closes (1009) while more of ours may be in flight; the
    # TCP reset that follows can swallow the close frame: only then is "no code" fine.
    assert code in (1000, 1003, 1008, 1009) or (oversized and code is None), f"closed with {code}"
    if code == 1009:
        assert oversized


def check_agent_error(frame: dict[str, Any]) -> None:
    assert isinstance(frame.get("code"), str) and isinstance(frame.get("message"), str), frame
    assert isinstance(frame.get("retryable"), bool), frame


def is_ping(frame: str | bytes) -> bool:
    try:
        value = json.loads(frame)
    except Exception:  # noqa: BLE001 — not JSON, or too deep
        return False
    return isinstance(value, dict) and value.get("type") == "ping"


async def agent_session(url: str, frames: list[tuple[Any, bool]], counts: Counter[str]) -> None:
    """Each frame, then a ping: a bad frame's `error` must come before the pong."""
    ws = await open_ws(url)
    if ws is None:
        return
    try:
        for frame, bad in frames:
            await ws.send(frame)
            counts["agent frames"] += 1
            counts["agent bad frames"] += bad
            await ws.send('{"type":"ping"}')
            counts["agent pings"] += 1
            errors, pongs, expected = 0, 0, 1 + is_ping(frame)  # a ping frame gets its own pong
            async with asyncio.timeout(15):
                while True:
                    answer = json.loads(await ws.recv())
                    if answer == {"type": "pong"}:
                        pongs += 1
                        if pongs == expected:
                            break
                        continue
                    if answer.get("type") == "error":
                        check_agent_error(answer)
                        errors += "id" not in answer  # (a turn's own error event has an id)
            assert errors or not bad, f"no error frame for {frame[:200]!r}"
            counts["agent pongs"] += 1
    except ConnectionClosed as exc:
        closed_as_expected(exc, [f for f, _ in frames])
    finally:
        await ws.close()


async def chat_session(url: str, frames: list[tuple[Any, str | None, bool]], counts: Counter[str]) -> None:
    """Each frame, then a `resume` probe of an unused chat: a bad frame's error (naming its
    requestId) must come before the probe's `no-active`."""
    ws = await open_ws(url)
    if ws is None:
        return
    try:
        for n, (frame, request_id, bad) in enumerate(frames):
            await ws.send(frame)
            counts["chat frames"] += 1
            counts["chat bad frames"] += bad
            probe = f"probe-{n}-{secrets.token_hex(3)}"
            await ws.send(json.dumps({"type": "resume", "requestId": probe, "id": probe, "headers": {}, "body": {}}))
            counts["chat probes"] += 1
            answered = False
            async with asyncio.timeout(15):
                while True:
                    answer = json.loads(await ws.recv())
                    assert isinstance(answer.get("requestId"), str), answer
                    if answer["requestId"] == probe:
                        assert answer == {"type": "no-active", "requestId": probe}, answer
                        break
                    if answer["type"] == "error":
                        assert isinstance(answer.get("errorText"), str), answer
                        answered = answered or answer["requestId"] == request_id
            assert answered or not bad, f"no error frame for {frame[:200]!r}"
            counts["chat probe answers"] += 1
    except ConnectionClosed as exc:
        closed_as_expected(exc, [f for f, _, _ in frames])
    finally:
        await ws.close()


def test_fuzz_websocket(fuzz_server, upstream, redis_url, capsys):
    pids = fuzz_server.worker_pids()
    before = owned_sessions(redis_url)
    turns_ok = 0
    counts: Counter[str] = Counter()

    @settings(max_examples=WS_EXAMPLES, **FUZZ_SETTINGS)
    @given(agent_frames=st.lists(agent_frame(), min_size=1, max_size=6),
           chat_frames=st.lists(chat_frame(), min_size=1, max_size=6),
           query=st.sampled_from([{}, {}, {}, {}, None]).flatmap(
               lambda q: st.just({}) if q is not None else st.fixed_dictionaries(
                   {}, optional={"session_id": SID, "ticket": st.text(max_size=40)})))
    def one(agent_frames, chat_frames, query):
        nonlocal turns_ok
        suffix = "?" + urlencode(query, errors="surrogatepass") if query else ""
        turns_ok += sum(1 for f, bad in agent_frames if not bad and isinstance(f, str) and '"message"' in f)
        turns_ok += sum(1 for f, _, bad in chat_frames if not bad and isinstance(f, str) and '"send"' in f)
        asyncio.run(agent_session(f"{fuzz_server.ws_url}/agent/ws{suffix}", agent_frames, counts))
        asyncio.run(chat_session(f"{fuzz_server.ws_url}/api/chat/ws", chat_frames, counts))

    one()
    assert owned_sessions(redis_url) - before <= turns_ok, "an invalid frame stored a session"
    assert_healthy(fuzz_server, pids)
    report(capsys, f"fuzz websocket: {counts['agent frames']} /agent/ws frames ({counts['agent bad frames']} "
                   f"known-bad, {counts['agent pongs']} pongs to {counts['agent pings']} pings), "
                   f"{counts['chat frames']} /api/chat/ws frames ({counts['chat bad frames']} known-bad with a "
                   f"requestId, {counts['chat probe answers']} answers to {counts['chat probes']} probes); "
                   f"{counts['agent frames'] + counts['chat frames']} fuzzed frames in all")
