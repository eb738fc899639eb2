"""OpenTelemetry traces end to end (issue #20): real server processes export OTLP/HTTP to a
collector this test runs (tests/otlp_collector.py, decoding with the official protobuf
definitions); the fake upstream answers the model calls; two instances share Redis.

What is asserted: the span tree of a tool-using streamed turn and its GenAI attributes, errors
on a failed tool and a failed model call, an incoming `traceparent`, the Link from a resume on
the other instance back to the turn (SSE, WebSocket, AI SDK), no prompt/answer text unless
content capture is switched on, never a key, the JSON
access log (one line per request, no query string, trace id) instead of uvicorn's, and that with
tracing off the server imports nothing of OpenTelemetry beyond what its dependencies (anthropic,
redis) import on their own.

`python -m tests.test_tracing` is a launcher for the tracing-off test: the server, with an audit
hook writing to $TRACING_IMPORTS_FILE every tracing-only module it imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest
import websockets

from .harness import FakeUpstream, Server, chat_and_leave, server_env, sse_events
from .otlp_collector import OtlpCollector, Span, span_strings

KEY = "agent-client-key-" + secrets.token_hex(12)  # AGENT_API_KEYS (a client's key)
PRINCIPAL = "key:" + hashlib.sha256(KEY.encode()).hexdigest()[:12]
UPSTREAM_KEY = "sk-ant-test-upstream-key-0123456789"  # harness.server_env's ANTHROPIC_API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
CALC = "calculator"
PROMPT = "What is 2+3*4? zebra-prompt-7731"
ANSWER = "It is fourteen, giraffe-answer-2209."
PROMPT_MARK, ANSWER_MARK = "zebra-prompt-7731", "giraffe-answer-2209"
# Scripted usage: the model-call spans must carry exactly these.
USAGE_1 = {"input_tokens": 101, "output_tokens": 17, "cache_read_input_tokens": 40, "cache_creation_input_tokens": 9}
USAGE_2 = {"input_tokens": 131, "output_tokens": 23, "cache_read_input_tokens": 49, "cache_creation_input_tokens": 0}
TURN = "invoke_agent agent-server"


def rid() -> str:
    return "t20-" + secrets.token_hex(8)


def script_tool_turn(fake: FakeUpstream) -> None:
    """A calculator call (the first answer starts after 60 ms), then the answer."""
    fake.script({"tool_use": [{"name": CALC, "input": {"expression": "2+3*4"}, "id": "toolu_T20"}],
                 "usage": USAGE_1, "ttft_ms": 60},
                {"text": ANSWER, "usage": USAGE_2})


# -- servers -----------------------------------------------------------------------------------
def traced_env(fake: FakeUpstream, redis_url: str | None, collector: OtlpCollector | None, service: str,
               **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in server_env(fake, redis_url).items() if not k.startswith("OTEL_")}
    env.update({"AGENT_API_KEYS": KEY, "RATE_LIMIT_RPM": "0", "RATE_LIMIT_TPM": "0", "OTEL_SERVICE_NAME": service})
    if collector is not None:
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_all(servers: list[Server]) -> list[Server]:
    """Start servers side by side (each takes a second or two); remember where their log began."""
    for s in servers:
        s.log_offset = s.log_path.stat().st_size if s.log_path.exists() else 0  # type: ignore[attr-defined]
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda s: s.start(), servers))
    return servers


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    c = OtlpCollector().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def traced(fake: FakeUpstream, redis_url: str, collector: OtlpCollector) -> Iterator[tuple[Server, Server]]:
    """Two tracing instances on one Redis: services agent-a and agent-b."""
    servers = [Server(traced_env(fake, redis_url, collector, f"agent-{n}"), name=f"traced-{n}") for n in "ab"]
    try:
        start_all(servers)
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def started() -> Iterator[list[Server]]:
    """Servers a test starts itself; stopped after it."""
    servers: list[Server] = []
    yield servers
    for s in servers:
        s.stop()


# -- logs ----------------------------------------------------------------------------------------
def log_lines(server: Server) -> list[str]:
    """The server's log since this test module started it."""
    with open(server.log_path, "rb") as f:
        f.seek(getattr(server, "log_offset", 0))
        return f.read().decode(errors="replace").splitlines()


def json_lines(server: Server, logger: str | None = None) -> list[dict[str, Any]]:
    out = []
    for line in log_lines(server):
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if logger is None or rec.get("logger") == logger:
                out.append(rec)
    return out


def access_lines(server: Server, request_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The server.access lines of a request (written when it ends: poll a little)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in json_lines(server, "server.access") if r.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# -- span helpers --------------------------------------------------------------------------------
def request_span(collector: OtlpCollector, name: str, request_id: str, timeout: float = 10.0) -> Span:
    spans = collector.wait_span(name, timeout=timeout, agent__request_id=request_id)
    assert len(spans) == 1, f"one {name!r} span per request, got {len(spans)}"
    return spans[0]


def wait_trace(collector: OtlpCollector, trace_id: str, counts: dict[str, int], timeout: float = 10.0) -> list[Span]:
    """Wait until the trace holds at least `counts[name]` spans of each name; return the trace."""
    def ready(_: list[Span]) -> list[Span] | None:
        spans = collector.trace(trace_id)
        names = [s["name"] for s in spans]
        return spans if all(names.count(n) >= c for n, c in counts.items()) else None
    try:
        return collector.wait_for(ready, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"trace {trace_id} incomplete, wanted {counts}; has:\n{collector.render(trace_id)}") from None


def only(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s["name"] == name]


def leaks(spans: list[Span], needles: list[str]) -> list[str]:
    """Where any of `needles` appears in what the spans say."""
    return [f"{s['name']}: {where} contains {needle!r}" for s in spans for where, text in span_strings(s)
            for needle in needles if needle and needle in text]


def within(child: Span, parent: Span) -> bool:
    return parent["start_ns"] <= child["start_ns"] <= child["end_ns"] <= parent["end_ns"]


# -- the tool-using streamed turn (several tests read it) -----------------------------------------
@pytest.fixture(scope="module")
def tool_turn(traced: tuple[Server, Server], fake: FakeUpstream, collector: OtlpCollector) -> SimpleNamespace:
    a, _ = traced
    fake.reset()
    script_tool_turn(fake)
    request_id = rid()
    with httpx.Client(base_url=a.url, timeout=30) as client:
        with client.stream("POST", "/agent/stream", json={"message": PROMPT},
                           headers={**AUTH, "X-Request-ID": request_id}) as r:
            assert r.status_code == 200, r.read()
            raw = b"".join(r.iter_raw())
            headers = r.headers
    events = sse_events(raw.decode().splitlines())
    end = events[-1]
    assert end["type"] == "turn_end" and end["text"] == ANSWER, events
    calls = fake.requests()
    assert len(calls) == 2
    model = calls[0]["body"]["model"]
    req = request_span(collector, "POST /agent/stream", request_id)
    spans = wait_trace(collector, req["trace_id"], {TURN: 1, f"chat {model}": 2, f"execute_tool {CALC}": 1,
                                                     "commit_turn": 1})
    return SimpleNamespace(server=a, request_id=request_id, raw=raw, events=events, end=end, headers=headers,
                           calls=calls, model=model, req=req, trace_id=req["trace_id"], spans=spans,
                           session_id=events[0]["session_id"], turn_id=events[0]["turn_id"])


def test_span_tree_of_a_tool_using_streamed_turn(tool_turn, collector):
    t = tool_turn
    tree = collector.render(t.trace_id)
    req = t.req
    assert req["kind"] == "SERVER" and req["parent_span_id"] == "", tree
    assert req["resource"].get("service.name") == "agent-a"
    assert req["attributes"] | {
        "http.request.method": "POST", "http.route": "/agent/stream", "url.path": "/agent/stream",
        "http.response.status_code": 200, "agent.request_id": t.request_id} == req["attributes"], req["attributes"]
    [turn] = only(t.spans, TURN)
    assert turn["parent_span_id"] == req["span_id"], tree
    assert turn["kind"] == "INTERNAL"
    assert turn["attributes"] | {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "agent-server",
        "gen_ai.conversation.id": t.session_id, "agent.turn_id": t.turn_id, "agent.outcome": "completed",
    } == turn["attributes"], turn["attributes"]
    assert "error.type" not in turn["attributes"] and turn["status"]["code"] != "ERROR"
    chats = only(t.spans, f"chat {t.model}")
    [tool] = only(t.spans, f"execute_tool {CALC}")
    [commit] = only(t.spans, "commit_turn")
    assert len(chats) == 2, tree
    for child in (*chats, tool, commit):
        assert child["parent_span_id"] == turn["span_id"], f"{child['name']} is a child of the turn:\n{tree}"
        assert child["trace_id"] == req["trace_id"]
        assert within(child, turn), f"{child['name']} lies within the turn span"
    # the tool ran between the two model calls
    assert chats[0]["start_ns"] <= tool["start_ns"] and tool["end_ns"] <= chats[1]["start_ns"], tree
    assert tool["kind"] == "INTERNAL" and commit["kind"] == "CLIENT"
    assert tool["attributes"] | {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": CALC,
                                 "gen_ai.tool.call.id": "toolu_T20", "gen_ai.tool.type": "function"} \
        == tool["attributes"], tool["attributes"]
    assert "error.type" not in tool["attributes"] and tool["status"]["code"] != "ERROR"
    assert commit["attributes"] | {"db.system.name": "redis", "db.operation.name": "commit_turn"} \
        == commit["attributes"], commit["attributes"]
    # every span of the trace came from the one instance, and no span is orphaned
    ids = {s["span_id"] for s in t.spans}
    assert all(s["parent_span_id"] in ids for s in t.spans if s is not req), tree
    assert {s["resource"].get("service.name") for s in t.spans} == {"agent-a"}


def test_model_call_spans_carry_the_genai_attributes(tool_turn):
    t = tool_turn
    chats = only(t.spans, f"chat {t.model}")
    for chat, call, usage, finish in zip(chats, t.calls, (USAGE_1, USAGE_2), ("tool_use", "end_turn")):
        attrs = chat["attributes"]
        assert chat["kind"] == "CLIENT"
        assert attrs | {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
            "gen_ai.request.model": call["body"]["model"], "gen_ai.request.max_tokens": call["body"]["max_tokens"],
            "gen_ai.response.model": t.model,
            "gen_ai.usage.input_tokens": usage["input_tokens"], "gen_ai.usage.output_tokens": usage["output_tokens"],
            "gen_ai.usage.cache_read.input_tokens": usage["cache_read_input_tokens"],
            "gen_ai.usage.cache_creation.input_tokens": usage["cache_creation_input_tokens"],
            "anthropic.request_id": call["request_id"],
        } == attrs, attrs
        assert list(attrs.get("gen_ai.response.finish_reasons") or []) == [finish], attrs
        assert str(attrs.get("gen_ai.response.id", "")).startswith("msg_"), attrs
        ttfc = attrs.get("gen_ai.response.time_to_first_chunk")
        assert isinstance(ttfc, float) and 0 < ttfc <= (chat["end_ns"] - chat["start_ns"]) / 1e9, attrs
        assert "error.type" not in attrs and chat["status"]["code"] != "ERROR"
    assert chats[0]["attributes"]["gen_ai.response.id"] != chats[1]["attributes"]["gen_ai.response.id"]
    # the first answer's first chunk came after the scripted 60 ms
    assert chats[0]["attributes"]["gen_ai.response.time_to_first_chunk"] >= 0.05
    assert [c["attributes"]["anthropic.request_id"] for c in chats] == t.end["request_ids"]


def test_no_prompt_answer_or_key_in_spans_by_default(tool_turn, collector):
    t = tool_turn
    spans = collector.trace(t.trace_id)
    found = leaks(spans, [PROMPT, ANSWER, PROMPT_MARK, ANSWER_MARK, KEY, UPSTREAM_KEY])
    assert not found, found
    for span in spans:
        assert not any(k in span["attributes"] for k in ("gen_ai.input.messages", "gen_ai.output.messages",
                                                          "gen_ai.system_instructions")), span["attributes"]
    for export in collector.exports:  # the bytes that left the servers, every export so far
        needles = [KEY, UPSTREAM_KEY] + ([PROMPT_MARK, ANSWER_MARK] if export["services"] <= {"agent-a", "agent-b"}
                                         else [])
        for needle in needles:
            assert needle.encode() not in export["body"], (needle, export["services"])


def test_a_failed_tool_and_a_failed_model_call_are_errors(traced, upstream, collector):
    a, _ = traced
    upstream.script({"tool_use": [{"name": CALC, "input": {"expr": "1+1"}, "id": "toolu_bad"}]}, {"status": 529})
    request_id = rid()
    with httpx.Client(base_url=a.url, timeout=30) as client:
        r = client.post("/agent", json={"message": "x"}, headers={**AUTH, "X-Request-ID": request_id})
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_overloaded", r.text
    model = upstream.requests()[0]["body"]["model"]
    req = request_span(collector, "POST /agent", request_id)
    spans = wait_trace(collector, req["trace_id"], {TURN: 1, f"chat {model}": 2, f"execute_tool {CALC}": 1})
    tree = collector.render(req["trace_id"])
    [turn] = only(spans, TURN)
    [tool] = only(spans, f"execute_tool {CALC}")
    ok, failed = only(spans, f"chat {model}")
    assert turn["attributes"].get("agent.outcome") == "failed" and turn["status"]["code"] == "ERROR", turn
    assert turn["attributes"].get("error.type") == "upstream_overloaded", turn["attributes"]
    assert tool["status"]["code"] == "ERROR" and tool["attributes"].get("error.type") == "invalid", tool
    assert ok["status"]["code"] != "ERROR" and "error.type" not in ok["attributes"]
    assert failed["status"]["code"] == "ERROR" and failed["attributes"].get("error.type"), failed
    assert failed["attributes"].get("anthropic.request_id") == upstream.requests()[1]["request_id"], failed
    assert req["attributes"].get("http.response.status_code") == 503, tree


def test_incoming_traceparent_is_honoured(traced, upstream, collector):
    a, _ = traced
    upstream.script({"text": "one"}, {"text": "two"}, {"text": "three"})
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    unsampled = secrets.token_hex(16)
    rids = [rid(), rid(), rid()]
    with httpx.Client(base_url=a.url, timeout=30, headers=AUTH) as client:
        # not sampled by the caller: the server records nothing for it (parent-based sampling)
        r = client.post("/agent", json={"message": "x"}, headers={
            "X-Request-ID": rids[0], "traceparent": f"00-{unsampled}-{secrets.token_hex(8)}-00"})
        assert r.status_code == 200, r.text
        # malformed (all-zero trace id): ignored, a new trace
        r = client.post("/agent", json={"message": "x"}, headers={
            "X-Request-ID": rids[1], "traceparent": f"00-{'0' * 32}-{parent_id}-01"})
        assert r.status_code == 200, r.text
        r = client.post("/agent", json={"message": "x"}, headers={
            "X-Request-ID": rids[2], "traceparent": f"00-{trace_id}-{parent_id}-01"})
        assert r.status_code == 200, r.text
        turn_id = r.json()["turn_id"]
    req = request_span(collector, "POST /agent", rids[2])
    assert req["trace_id"] == trace_id and req["parent_span_id"] == parent_id, req
    spans = wait_trace(collector, trace_id, {TURN: 1, "commit_turn": 1})
    [turn] = only(spans, TURN)
    assert turn["parent_span_id"] == req["span_id"] and turn["attributes"].get("agent.turn_id") == turn_id
    bad = request_span(collector, "POST /agent", rids[1])
    assert bad["parent_span_id"] == "" and bad["trace_id"] not in ("0" * 32, trace_id)
    # the unsampled request was exported before the later ones, if at all: it was not
    assert not collector.find(trace_id=unsampled), collector.render(unsampled)
    assert not collector.find(agent__request_id=rids[0])
    # the access lines carry the trace id the request ran in: the caller's (sampled or not)
    assert access_lines(a, rids[2])[0].get("trace_id") == trace_id
    assert access_lines(a, rids[1])[0].get("trace_id") == bad["trace_id"]
    assert access_lines(a, rids[0])[0].get("trace_id") in (None, unsampled), (access_lines(a, rids[0]), unsampled)


def test_resume_on_the_other_instance_links_to_the_turn(traced, upstream, collector):
    a, b = traced
    upstream.script({"tokens": 40, "pace_ms": 20})
    rid_a, rid_b = rid(), rid()
    head: list[dict[str, Any]] = []
    with httpx.Client(timeout=30, headers=AUTH) as client:
        with client.stream("POST", a.url + "/agent/stream", json={"message": "count"},
                           headers={"X-Request-ID": rid_a}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    head.append(json.loads(line[6:]))
                if len(head) == 6:
                    break
        sid, turn_id, last = head[0]["session_id"], head[0]["turn_id"], head[-1]["id"]
        r = client.get(f"{b.url}/sessions/{sid}/stream", headers={"Last-Event-ID": last, "X-Request-ID": rid_b})
        assert r.status_code == 200
        tail = sse_events(r.text.splitlines())
    assert tail[-1]["type"] == "turn_end" and tail[-1]["turn_id"] == turn_id
    [turn] = collector.wait_span(TURN, agent__turn_id=turn_id)
    assert turn["resource"].get("service.name") == "agent-a"
    resume = request_span(collector, "GET /sessions/{session_id}/stream", rid_b)
    assert resume["resource"].get("service.name") == "agent-b"
    assert resume["kind"] == "SERVER"
    assert resume["attributes"].get("http.route") == "/sessions/{session_id}/stream"
    assert resume["attributes"].get("url.path") == f"/sessions/{sid}/stream"
    links = [(link["trace_id"], link["span_id"]) for link in resume["links"]]
    assert (turn["trace_id"], turn["span_id"]) in links, (links, turn["trace_id"], turn["span_id"])
    # the resume is its own trace (no traceparent was sent), linked to the turn's, not a child of it
    assert resume["trace_id"] != turn["trace_id"]
    origin = request_span(collector, "POST /agent/stream", rid_a)
    assert turn["trace_id"] == origin["trace_id"] and turn["parent_span_id"] == origin["span_id"]


async def test_websocket_message_span_parents_the_turn_and_a_resume_links_to_it(traced, upstream, collector):
    a, b = traced
    upstream.script({"tokens": 30, "pace_ms": 20})
    rid_a, rid_b = rid(), rid()
    head: list[dict[str, Any]] = []
    async with websockets.connect(f"{a.ws_url}/agent/ws", additional_headers={**AUTH, "X-Request-ID": rid_a}) as ws:
        await ws.send(json.dumps({"type": "message", "message": "count"}))
        while len(head) < 6:
            e = json.loads(await ws.recv())
            if e["type"] not in ("ping", "pong"):
                head.append(e)
    sid, turn_id = head[0]["session_id"], head[0]["turn_id"]
    tail: list[dict[str, Any]] = []
    async with websockets.connect(f"{b.ws_url}/agent/ws?session_id={sid}",
                                  additional_headers={**AUTH, "X-Request-ID": rid_b}) as ws:
        await ws.send(json.dumps({"type": "resume", "turn_id": turn_id, "last_event_id": head[-1]["id"]}))
        while not tail or tail[-1]["type"] not in ("turn_end", "error"):
            e = json.loads(await ws.recv())
            if e["type"] not in ("ping", "pong"):
                tail.append(e)
    assert tail[-1]["type"] == "turn_end"
    [turn] = collector.wait_span(TURN, agent__turn_id=turn_id)
    message = collector.wait_for(lambda _: collector.by_id(turn["parent_span_id"]))
    assert message["name"] == "WS /agent/ws message" and message["kind"] == "SERVER", message
    assert message["resource"].get("service.name") == "agent-a"
    linked = collector.wait_span(service="agent-b", where=lambda s: any(
        link["span_id"] == turn["span_id"] and link["trace_id"] == turn["trace_id"] for link in s["links"]))
    assert linked[0]["name"].startswith("WS /agent/ws"), [s["name"] for s in linked]
    [connection] = collector.wait_span("WS /agent/ws", service="agent-a", agent__request_id=rid_a)
    assert connection["kind"] == "SERVER" and message["parent_span_id"] == connection["span_id"]
    assert connection["attributes"].get("http.response.status_code") == 101, connection["attributes"]
    [other] = collector.wait_span("WS /agent/ws", service="agent-b", agent__request_id=rid_b)
    assert other["attributes"].get("url.path") == "/agent/ws", other["attributes"]
    assert sid not in json.dumps(other), "no query string in the span"


async def test_ai_sdk_resume_on_the_other_instance_links_to_the_turn(traced, upstream, collector):
    a, b = traced
    upstream.script({"tokens": 30, "pace_ms": 20})
    cid = secrets.token_urlsafe(12)
    question = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "count"}]}
    rid_b = rid()
    async with httpx.AsyncClient(timeout=30, headers=AUTH) as client:
        turn_id = await chat_and_leave(client, a.url, cid, question)  # (the turn goes on)
        r = await client.get(f"{b.url}/api/chat/{cid}/stream", headers={"X-Request-ID": rid_b})
        assert r.status_code == 200 and '"finish"' in r.text
    [turn] = collector.wait_span(TURN, agent__turn_id=turn_id)
    resume = request_span(collector, "GET /api/chat/{chat_id}/stream", rid_b)
    assert resume["resource"].get("service.name") == "agent-b"
    links = [(link["trace_id"], link["span_id"]) for link in resume["links"]]
    assert (turn["trace_id"], turn["span_id"]) in links, (links, turn["trace_id"], turn["span_id"])


def test_content_capture_records_messages_but_never_keys(fake, redis_url, collector, started):
    fake.reset()
    server = Server(traced_env(fake, redis_url, collector, "agent-content",
                               OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true"), name="traced-content")
    started.append(server)
    start_all([server])
    script_tool_turn(fake)
    request_id = rid()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/agent/stream", json={"message": PROMPT}, headers={**AUTH, "X-Request-ID": request_id})
        assert r.status_code == 200 and ANSWER in r.text
    model = fake.requests()[0]["body"]["model"]
    req = request_span(collector, "POST /agent/stream", request_id)
    spans = wait_trace(collector, req["trace_id"], {f"chat {model}": 2, "commit_turn": 1})
    chats = only(spans, f"chat {model}")
    for chat in chats:
        for key in ("gen_ai.input.messages", "gen_ai.output.messages"):
            value = chat["attributes"].get(key)
            assert isinstance(value, str), f"{key} is a JSON string: {chat['attributes']}"
            assert isinstance(json.loads(value), list), value
        assert PROMPT in chat["attributes"]["gen_ai.input.messages"]
    assert ANSWER in chats[1]["attributes"]["gen_ai.output.messages"]
    assert ANSWER not in chats[0]["attributes"]["gen_ai.output.messages"]
    for msg in json.loads(chats[0]["attributes"]["gen_ai.input.messages"]):
        assert isinstance(msg, dict) and msg.get("role") in ("system", "user", "assistant", "tool"), msg
    everything = collector.find(service="agent-content")
    assert not leaks(everything, [KEY, UPSTREAM_KEY]), leaks(everything, [KEY, UPSTREAM_KEY])
    for body in collector.raw:
        assert KEY.encode() not in body and UPSTREAM_KEY.encode() not in body


async def test_json_access_log_replaces_uvicorns(tool_turn, traced, collector):
    a, _ = traced
    t = tool_turn
    secret = "s3cr3t-" + secrets.token_hex(8)
    rid_get, rid_404, rid_401, rid_ws = rid(), rid(), rid(), rid()
    async with httpx.AsyncClient(base_url=a.url, timeout=30) as client:
        got = await client.get(f"/sessions/{t.session_id}?access_token={secret}&view=full",
                               headers={**AUTH, "X-Request-ID": rid_get})
        assert got.status_code == 200 and got.headers["x-request-id"] == rid_get
        missing = await client.get(f"/no/such/path?token={secret}", headers={**AUTH, "X-Request-ID": rid_404})
        assert missing.status_code == 404
        refused = await client.get(f"/sessions/{t.session_id}", headers={"X-Request-ID": rid_401})
        assert refused.status_code == 401
    async with websockets.connect(f"{a.ws_url}/agent/ws", additional_headers={**AUTH, "X-Request-ID": rid_ws}) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        await ws.recv()

    # the streamed turn: one line, its bytes, its trace
    [line] = access_lines(a, t.request_id)
    assert line["logger"] == "server.access" and line["event"] == "access"
    assert line | {"method": "POST", "path": "/agent/stream", "route": "/agent/stream", "status": 200,
                   "bytes": len(t.raw), "request_id": t.request_id, "principal": PRINCIPAL,
                   "trace_id": t.trace_id} == line, line
    assert t.headers["x-request-id"] == t.request_id
    duration = (t.req["end_ns"] - t.req["start_ns"]) / 1e6
    assert isinstance(line["duration_ms"], (int, float)) and 0 < line["duration_ms"] <= duration * 1.5 + 50, \
        (line["duration_ms"], duration)

    [line] = access_lines(a, rid_get)
    span = request_span(collector, "GET /sessions/{session_id}", rid_get)
    assert line | {"method": "GET", "path": f"/sessions/{t.session_id}", "route": "/sessions/{session_id}",
                   "status": 200, "bytes": len(got.content), "principal": PRINCIPAL,
                   "trace_id": span["trace_id"]} == line, line
    assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
    assert span["attributes"].get("url.path") == f"/sessions/{t.session_id}"
    assert not leaks([span], [secret, "access_token"]), leaks([span], [secret, "access_token"])

    [line] = access_lines(a, rid_404)
    assert line["status"] == 404 and line["path"] == "/no/such/path" and line["bytes"] == len(missing.content)
    [line] = access_lines(a, rid_401)
    assert line["status"] == 401 and line.get("principal") in (None, "anonymous"), line
    [line] = access_lines(a, rid_ws)
    assert line["status"] == 101 and line["path"] == "/agent/ws" and line["route"] == "/agent/ws", line
    assert line["principal"] == PRINCIPAL and isinstance(line["duration_ms"], (int, float))

    # the per-turn line carries the trace id
    turn_lines = [r for r in json_lines(a, "server.turn") if r.get("turn_id") == t.turn_id]
    assert len(turn_lines) == 1 and turn_lines[0].get("trace_id") == t.trace_id, turn_lines

    # no query string value, no key, and no uvicorn text access line anywhere in the log
    text = "\n".join(log_lines(a))
    for needle in (secret, KEY, UPSTREAM_KEY):
        assert needle not in text, f"{needle!r} in the log"
    uvicorn_access = [ln for ln in log_lines(a) if re.search(r'"[A-Z]+ \S+ HTTP/[\d.]+" \d{3}', ln)]
    assert not uvicorn_access, uvicorn_access[:3]
    # exactly one access line per request of this test
    ids = [r.get("request_id") for r in json_lines(a, "server.access")]
    assert all(ids.count(x) == 1 for x in (t.request_id, rid_get, rid_404, rid_401, rid_ws))


async def test_websocket_handshake_has_no_uvicorn_text_line_with_its_query(traced):
    """uvicorn logs `"WebSocket /path?query" [accepted]` on its error logger whatever access_log
    says: the JSON access line replaces it, and a query value must not reach the log."""
    a, _ = traced
    secret = "s3cr3t-" + secrets.token_hex(8)
    request_id = rid()
    async with websockets.connect(f"{a.ws_url}/agent/ws?hint={secret}",
                                  additional_headers={**AUTH, "X-Request-ID": request_id}) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        await ws.recv()
    [line] = access_lines(a, request_id)
    assert line["status"] == 101 and line["path"] == "/agent/ws"
    accepted = [ln for ln in log_lines(a) if "[accepted]" in ln or secret in ln]
    assert not accepted, accepted[:3]


def test_tracing_off_imports_nothing_and_the_server_works(fake, redis_url, collector, started, tmp_path):
    """Off twice: no OTEL_* at all, and an endpoint with OTEL_SDK_DISABLED=true (both started at once)."""
    fake.reset()
    modes: dict[str, dict[str, Any]] = {
        "unset": {},
        "sdk_disabled": {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_SDK_DISABLED": "true",
                         "OTEL_BSP_SCHEDULE_DELAY": "100"},
    }
    servers = {}
    for mode, extra in modes.items():
        env = traced_env(fake, redis_url, None, f"agent-off-{mode}",
                         TRACING_IMPORTS_FILE=tmp_path / f"imports-{mode}.txt", **extra)
        servers[mode] = Server(env, name=f"untraced-{mode}", module="tests.test_tracing")
    started.extend(servers.values())
    start_all(list(servers.values()))
    for mode, server in servers.items():
        fake.script({"tool_use": [{"name": CALC, "input": {"expression": "6*7"}}]}, {"text": "42."})
        request_id = rid()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.post("/agent/stream", json={"message": "6*7?"}, headers={**AUTH, "X-Request-ID": request_id})
            assert r.status_code == 200 and r.headers["x-request-id"] == request_id, mode
            end = sse_events(r.text.splitlines())[-1]
            assert end["type"] == "turn_end" and end["text"] == "42.", (mode, end)
        [line] = access_lines(server, request_id)
        assert line["status"] == 200 and line["path"] == "/agent/stream" and line.get("trace_id") is None, line
        turn_lines = [x for x in json_lines(server, "server.turn") if x.get("request_id") == request_id]
        assert len(turn_lines) == 1 and turn_lines[0].get("trace_id") is None, turn_lines
    time.sleep(0.3)  # (a schedule delay of 100 ms: anything exported would have arrived)
    for mode, server in servers.items():
        imports = tmp_path / f"imports-{mode}.txt"
        assert imports.exists(), "the launcher's import hook ran"
        assert imports.read_text() == "", f"imported with tracing {mode}:\n{imports.read_text()}"
        assert not collector.find(service=f"agent-off-{mode}"), mode


# -- launcher: `python -m tests.test_tracing` ------------------------------------------------------
# Loaded with tracing on only: the SDK's tracing half, the exporter, the propagators, protobuf, and
# the exporter's HTTP client. (The pinned anthropic and redis import parts of opentelemetry
# themselves, whatever our code does: anthropic its API for its own non-recording spans, redis
# opentelemetry.sdk.metrics when the SDK is installed. Those are the baseline, not a finding.)
TRACING_ONLY = ("opentelemetry", "google.protobuf", "requests")


def _serve_recording_opentelemetry_imports() -> int:
    """Run the server (as `python -m server` does) with an audit hook appending to
    $TRACING_IMPORTS_FILE (created empty: the hook ran) the name of every module of TRACING_ONLY
    imported beyond the baseline: what `import anthropic, redis.asyncio` loads on its own."""
    path = Path(os.environ.pop("TRACING_IMPORTS_FILE"))
    import anthropic  # noqa: F401 - the baseline
    import redis.asyncio  # noqa: F401

    def traced_only(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in TRACING_ONLY)

    baseline = {m for m in sys.modules if traced_only(m)}
    unexpected = sorted(m for m in baseline if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter",
                                                             "opentelemetry.propagat", "opentelemetry.proto",
                                                             "google.protobuf", "requests")))
    path.write_text("".join(f"{m} (in the baseline)\n" for m in unexpected))

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "import" and traced_only(str(args[0])) and args[0] not in baseline:
            with open(path, "a") as f:
                f.write(f"{args[0]}\n")

    sys.addaudithook(hook)
    from server.__main__ import main

    return main()


if __name__ == "__main__":
    sys.exit(_serve_recording_opentelemetry_imports())
