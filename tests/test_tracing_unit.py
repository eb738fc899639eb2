"""server/tracing.py, the access log and the log filters, in one process (issue #20).

The app runs in this process (Starlette's TestClient: its lifespan, memory store, the fake upstream
subprocess) and its spans go to the SDK's in-memory exporter, so each test reads exact span objects.
tests/test_tracing.py is the end-to-end counterpart (OTLP export, two instances on Redis).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from starlette.testclient import TestClient

from server import logs, tracing
from server.config import Settings

from .harness import ROOT, FakeUpstream, sse_events

KEY = "unit-client-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
UPSTREAM_KEY = "sk-ant-test-upstream-key-0123456789"
TURN = "invoke_agent agent-server"
USAGE_1 = {"input_tokens": 11, "output_tokens": 7, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 3}
USAGE_2 = {"input_tokens": 13, "output_tokens": 9, "cache_read_input_tokens": 6, "cache_creation_input_tokens": 0}


# -- the switch ----------------------------------------------------------------------------------
@pytest.mark.parametrize("env, on", [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),  # no endpoint: nowhere to send
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "false"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "otlp"}, True),
])
def test_tracing_is_on_only_when_the_standard_environment_asks(env, on):
    assert tracing.wanted(env) is on


# What only tracing may load. The dependencies load some of opentelemetry on their own, whatever we
# do: anthropic (2.12) requires opentelemetry-api and imports it; redis (8.1) imports
# opentelemetry.sdk.metrics when the SDK is installed. So the check is: these never, and nothing
# beyond what `import anthropic, redis.asyncio` loads by itself.
TRACING_ONLY = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.propagate",
                "opentelemetry.propagators", "opentelemetry.proto", "google.protobuf", "requests")
OFF_PROBE = """
import asyncio, json, os, sys
for k in [k for k in os.environ if k.startswith("OTEL_")]:
    del os.environ[k]
import anthropic, redis.asyncio
baseline = {m for m in sys.modules if m.startswith("opentelemetry")}
import server.app
from server import tracing
from server.config import Settings
from server.lifecycle import components

async def main():
    settings = Settings.from_env({"ANTHROPIC_API_KEY": "sk-ant-x", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"})
    async with components(settings) as engine:  # (what a worker's lifespan runs: tracing.setup included)
        return tracing.enabled

enabled = asyncio.run(main())
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry") and m not in baseline)
tracing_only = sorted(m for m in sys.modules if m.startswith(PREFIXES))
print(json.dumps({"enabled": enabled, "added": loaded, "tracing_only": tracing_only}))
"""


def test_tracing_off_loads_nothing_of_the_sdk_exporter_or_protobuf():
    probe = OFF_PROBE.replace("PREFIXES", repr(TRACING_ONLY))
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"enabled": False, "added": [], "tracing_only": []}, result


def test_the_facade_is_inert_when_off():
    assert not tracing.enabled
    assert tracing.current_trace_id() is None
    with tracing.NOOP as nothing:
        assert nothing is None
    tracing.shutdown()  # (nothing to shut down: no error)


# -- fixtures: an in-memory exporter, the app in this process -------------------------------------
@pytest.fixture
def spans() -> Iterator[Any]:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.shutdown()
    assert tracing.setup(env={}, exporter=exporter)
    yield exporter
    tracing.shutdown()
    assert not tracing.enabled


@pytest.fixture
def capture_spans() -> Iterator[Any]:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.shutdown()
    assert tracing.setup(env={tracing.CAPTURE_ENV: "true"}, exporter=exporter) and tracing.capture_content
    yield exporter
    tracing.shutdown()


class Lines(logging.Handler):
    """The records of one logger, with their structured fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def fields(self) -> list[dict[str, Any]]:
        return [r.fields for r in self.records  # type: ignore[attr-defined]
                if isinstance(getattr(r, "fields", None), dict)]

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(logs.JsonFormatter().format(r)) for r in self.records]


@pytest.fixture
def app(upstream: FakeUpstream) -> Iterator[SimpleNamespace]:
    """The app in this process (memory store; its lifespan runs), with its access and turn lines."""
    from server.app import create_app

    settings = Settings.from_env({"ANTHROPIC_API_KEY": UPSTREAM_KEY, "ANTHROPIC_BASE_URL": upstream.url,
                                  "ANTHROPIC_MAX_RETRIES": "0", "AGENT_API_KEYS": KEY, "RATE_LIMIT_RPM": "0",
                                  "RATE_LIMIT_TPM": "0", "HEARTBEAT_SECONDS": "15",
                                  "SERVER_TOOLS": "web_search,web_fetch"})
    access, turns = Lines(), Lines()
    application = create_app(settings)
    logging.getLogger("server.access").addHandler(access)
    logging.getLogger("server.turn").addHandler(turns)
    try:
        with TestClient(application, base_url="http://127.0.0.1") as client:
            yield SimpleNamespace(client=client, access=access, turns=turns, upstream=upstream)
    finally:
        logging.getLogger("server.access").removeHandler(access)
        logging.getLogger("server.turn").removeHandler(turns)


def by_name(exporter: Any, name: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: Any, name: str, **attributes: Any) -> Any:
    found = [s for s in by_name(exporter, name) if all(s.attributes.get(k.replace("__", ".")) == v
                                                       for k, v in attributes.items())]
    assert len(found) == 1, (name, attributes, [(s.name, dict(s.attributes)) for s in exporter.get_finished_spans()])
    return found[0]


def wait_span(exporter: Any, name: str, timeout: float = 5.0, **attributes: Any) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return one(exporter, name, **attributes)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def hex_ids(span: Any) -> tuple[str, str]:
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def stream_turn(client: TestClient, body: dict[str, Any], request_id: str) -> tuple[bytes, list[dict[str, Any]]]:
    with client.stream("POST", "/agent/stream", json=body, headers={**AUTH, "X-Request-ID": request_id}) as r:
        assert r.status_code == 200, r.read()
        raw = b"".join(r.iter_raw())
    return raw, sse_events(raw.decode().splitlines())


# -- spans --------------------------------------------------------------------------------------
def test_a_streamed_tool_turn_makes_the_span_tree(app, spans):
    app.upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "2+3"}, "id": "toolu_U1"}],
                         "usage": USAGE_1, "ttft_ms": 30},
                        {"text": "Five.", "usage": USAGE_2})
    raw, events = stream_turn(app.client, {"message": "2+3?"}, "unit-1")
    start, end = events[0], events[-1]
    assert start["type"] == "turn_start" and end["type"] == "turn_end" and end["text"] == "Five."
    model = start["model"]

    req = wait_span(spans, "POST /agent/stream")
    turn = wait_span(spans, TURN)
    chats = by_name(spans, f"chat {model}")
    tool = one(spans, "execute_tool calculator")
    commit = one(spans, "commit_turn")
    assert req.kind.name == "SERVER" and req.parent is None
    assert dict(req.attributes) == {"http.request.method": "POST", "url.path": "/agent/stream", "url.scheme": "http",
                                    "agent.request_id": "unit-1", "http.route": "/agent/stream",
                                    "http.response.status_code": 200}
    assert turn.kind.name == "INTERNAL" and turn.parent.span_id == req.context.span_id
    assert turn.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert turn.attributes["gen_ai.agent.name"] == "agent-server"
    assert turn.attributes["gen_ai.conversation.id"] == end["session_id"]
    assert turn.attributes["agent.turn_id"] == end["turn_id"] and turn.attributes["agent.outcome"] == "completed"
    assert turn.status.status_code.name == "UNSET" and "error.type" not in turn.attributes
    # the turn's traceparent is in its turn_start event (followers on any worker link to it)
    trace_id, span_id = hex_ids(turn)
    assert start["traceparent"] == f"00-{trace_id}-{span_id}-{int(turn.context.trace_flags):02x}"
    assert int(turn.context.trace_flags) & 1, "sampled"

    assert len(chats) == 2
    for chat, usage, finish, call in zip(chats, (USAGE_1, USAGE_2), ("tool_use", "end_turn"), app.upstream.requests()):
        a = chat.attributes
        assert chat.kind.name == "CLIENT" and chat.parent.span_id == turn.context.span_id
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "anthropic"
        assert a["gen_ai.request.model"] == model and a["gen_ai.response.model"] == model
        assert a["gen_ai.request.max_tokens"] == call["body"]["max_tokens"]
        assert a["gen_ai.usage.input_tokens"] == usage["input_tokens"]
        assert a["gen_ai.usage.output_tokens"] == usage["output_tokens"]
        assert a["gen_ai.usage.cache_read.input_tokens"] == usage["cache_read_input_tokens"]
        assert a["gen_ai.usage.cache_creation.input_tokens"] == usage["cache_creation_input_tokens"]
        assert tuple(a["gen_ai.response.finish_reasons"]) == (finish,)
        assert a["gen_ai.response.id"].startswith("msg_") and a["anthropic.request_id"] == call["request_id"]
        assert 0 < a["gen_ai.response.time_to_first_chunk"] <= (chat.end_time - chat.start_time) / 1e9
        assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a  # (capture is off)
    assert chats[0].attributes["gen_ai.response.time_to_first_chunk"] >= 0.025
    assert [c.attributes["anthropic.request_id"] for c in chats] == end["request_ids"]

    assert tool.kind.name == "INTERNAL" and tool.parent.span_id == turn.context.span_id
    assert dict(tool.attributes) == {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "calculator",
                                     "gen_ai.tool.call.id": "toolu_U1", "gen_ai.tool.type": "function"}
    assert chats[0].end_time <= tool.start_time <= tool.end_time <= chats[1].start_time
    assert commit.kind.name == "CLIENT" and commit.parent.span_id == turn.context.span_id
    assert dict(commit.attributes) == {"db.system.name": "memory", "db.operation.name": "commit_turn"}
    assert turn.start_time <= commit.start_time <= commit.end_time <= turn.end_time

    # the access line and the turn line carry the trace id
    [line] = [f for f in app.access.fields() if f["request_id"] == "unit-1"]
    assert line == {"event": "access", "method": "POST", "path": "/agent/stream", "route": "/agent/stream",
                    "status": 200, "duration_ms": line["duration_ms"], "bytes": len(raw), "request_id": "unit-1",
                    "principal": line["principal"], "trace_id": trace_id}
    assert line["principal"].startswith("key:") and line["duration_ms"] > 0
    [turn_line] = [f for f in app.turns.fields() if f["turn_id"] == end["turn_id"]]
    assert turn_line["trace_id"] == trace_id


def test_an_incoming_traceparent_is_the_parent(app, spans):
    app.upstream.script({"text": "hi"})
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = app.client.post("/agent", json={"message": "x"},
                        headers={**AUTH, "X-Request-ID": "unit-tp", "traceparent": f"00-{trace_id}-{parent}-01"})
    assert r.status_code == 200, r.text
    req = wait_span(spans, "POST /agent")
    assert hex_ids(req)[0] == trace_id and format(req.parent.span_id, "016x") == parent and req.parent.is_remote
    turn = wait_span(spans, TURN)
    assert hex_ids(turn)[0] == trace_id and turn.parent.span_id == req.context.span_id


def test_a_resume_and_an_idempotent_retry_link_to_the_turn(app, spans):
    app.upstream.script({"text": "one two three"})
    _, events = stream_turn(app.client, {"message": "x", "message_id": "mid-1"}, "unit-origin")
    sid, turn_id = events[0]["session_id"], events[0]["turn_id"]
    turn = wait_span(spans, TURN)
    # the turn is over: its span context is read back from its turn_start event in the log
    r = app.client.get(f"/sessions/{sid}/stream", headers={**AUTH, "Last-Event-ID": events[1]["id"],
                                                          "X-Request-ID": "unit-resume"})
    assert r.status_code == 200 and sse_events(r.text.splitlines())[-1]["type"] == "turn_end"
    resume = wait_span(spans, "GET /sessions/{session_id}/stream")
    assert [(link.context.trace_id, link.context.span_id) for link in resume.links] == \
        [(turn.context.trace_id, turn.context.span_id)]
    assert resume.links[0].attributes["agent.turn_id"] == turn_id
    assert resume.context.trace_id != turn.context.trace_id, "a resume is its own trace, linked"
    # the same message id again joins that turn: linked as well
    r = app.client.post("/agent/stream", json={"message": "x", "message_id": "mid-1", "session_id": sid},
                        headers={**AUTH, "X-Request-ID": "unit-retry"})
    assert r.status_code == 200 and sse_events(r.text.splitlines())[0]["turn_id"] == turn_id
    retry = wait_span(spans, "POST /agent/stream", agent__request_id="unit-retry")
    assert [link.context.span_id for link in retry.links] == [turn.context.span_id]
    assert len(by_name(spans, TURN)) == 1


def test_websocket_message_spans_parent_their_turns(app, spans):
    app.upstream.script({"text": "over the socket"})
    with app.client.websocket_connect("/agent/ws", headers={**AUTH, "X-Request-ID": "unit-ws"}) as ws:
        ws.send_text(json.dumps({"type": "ping"}))
        assert json.loads(ws.receive_text())["type"] == "pong"
        ws.send_text(json.dumps({"type": "message", "message": "hi"}))
        while (event := json.loads(ws.receive_text()))["type"] not in ("turn_end", "error"):
            pass
        assert event["type"] == "turn_end"
        ws.send_text(json.dumps({"type": "resume", "session_id": event["session_id"]}))
        while json.loads(ws.receive_text())["type"] != "turn_end":
            pass
        ws.send_text(json.dumps({"type": "nonsense"}))
        assert json.loads(ws.receive_text())["code"] == "invalid_request"
    connection = wait_span(spans, "WS /agent/ws")
    turn = wait_span(spans, TURN)
    messages = by_name(spans, "WS /agent/ws message")
    kinds = [m.attributes.get("agent.ws.frame_type") for m in messages]
    assert kinds == ["ping", "message", "resume", "nonsense"]
    assert all(m.kind.name == "SERVER" and m.parent.span_id == connection.context.span_id for m in messages)
    assert connection.kind.name == "SERVER" and connection.attributes["http.response.status_code"] == 101
    assert connection.attributes["agent.request_id"] == "unit-ws"
    assert turn.parent.span_id == messages[1].context.span_id
    assert [link.context.span_id for link in messages[2].links] == [turn.context.span_id]
    assert messages[3].attributes["error.type"] == "invalid_request" and messages[3].status.status_code.name == "ERROR"
    [line] = [f for f in app.access.fields() if f["request_id"] == "unit-ws"]
    assert line["status"] == 101 and line["route"] == "/agent/ws" and "bytes" not in line
    assert line["trace_id"] == hex_ids(connection)[0]


def test_failures_set_error_type_and_status(app, spans):
    app.upstream.script({"status": 500})
    r = app.client.post("/agent", json={"message": "x"}, headers=AUTH)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    turn = wait_span(spans, TURN)
    [chat] = [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]
    for span in (turn, chat):
        assert span.attributes["error.type"] == "upstream_unavailable" and span.status.status_code.name == "ERROR"
    assert turn.attributes["agent.outcome"] == "failed"
    assert chat.attributes["anthropic.request_id"] == app.upstream.requests()[-1]["request_id"]
    assert not by_name(spans, "commit_turn")[0].attributes.get("error.type")  # (the failure is committed fine)

    spans.clear()
    app.upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "import os"}, "id": "toolu_B"},
                                      {"name": "no_such_tool", "input": {}, "id": "toolu_N"}]},
                        {"text": "Sorry."})
    r = app.client.post("/agent", json={"message": "x"}, headers=AUTH)
    assert r.status_code == 200, r.text
    bad = one(spans, "execute_tool calculator")
    unknown = one(spans, "execute_tool no_such_tool")
    assert bad.attributes["error.type"] == "error" and bad.status.status_code.name == "ERROR"
    assert unknown.attributes["error.type"] == "invalid"
    assert wait_span(spans, TURN).attributes["agent.outcome"] == "completed"


def test_a_cancelled_turn_ends_its_spans_without_error(app, spans):
    app.upstream.script({"tokens": 400, "pace_ms": 10})
    with app.client.websocket_connect("/agent/ws", headers=AUTH) as ws:
        ws.send_text(json.dumps({"type": "message", "message": "count"}))
        while json.loads(ws.receive_text())["type"] != "text_delta":
            pass
        ws.send_text(json.dumps({"type": "cancel"}))
        while (event := json.loads(ws.receive_text()))["type"] not in ("turn_end", "error"):
            pass
    assert event["type"] == "turn_end" and event["cancelled"] is True
    turn = wait_span(spans, TURN)
    [chat] = [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]
    assert turn.attributes["agent.outcome"] == "cancelled" and "error.type" not in turn.attributes
    assert "error.type" not in chat.attributes and chat.end_time <= turn.end_time


def test_a_server_tool_is_a_zero_length_span(app, spans):
    fetch = {"type": "server_tool_use", "id": "srvtoolu_F", "name": "web_fetch", "input": {"url": "https://x.test"}}
    failed = {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_F",
              "content": {"type": "web_fetch_tool_result_error", "error_code": "url_not_accessible"}}
    app.upstream.script({"blocks": [fetch, failed, {"type": "text", "text": "Could not fetch it."}]})
    from server import metrics

    def counted() -> float:
        return metrics.setup().tool_calls.labels("web_fetch", "error")._value.get()

    before = counted()
    r = app.client.post("/agent", json={"message": "fetch"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert counted() - before == 1, "server tools count in agent_tool_calls_total too"
    turn = wait_span(spans, TURN)
    span = one(spans, "execute_tool web_fetch")
    assert span.parent.span_id == turn.context.span_id and span.start_time == span.end_time
    assert span.attributes["gen_ai.tool.type"] == "server" and span.attributes["gen_ai.tool.call.id"] == "srvtoolu_F"
    assert span.attributes["error.type"] == "url_not_accessible"


def test_content_capture_records_messages_without_keys_or_image_bytes(app, capture_spans):
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
    app.upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "6*7"}, "id": "toolu_C"}]},
                        {"text": "Forty-two, marmot."})
    message = [{"type": "text", "text": "What is 6*7? otter"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]
    r = app.client.post("/agent", json={"message": message, "system": "Be brief, heron."}, headers=AUTH)
    assert r.status_code == 200, r.text
    wait_span(capture_spans, TURN)
    chats = [s for s in capture_spans.get_finished_spans() if s.name.startswith("chat ")]
    first_in = json.loads(chats[0].attributes["gen_ai.input.messages"])
    assert first_in[0]["role"] == "user" and {"type": "text", "content": "What is 6*7? otter"} in first_in[0]["parts"]
    assert {"type": "blob", "modality": "image", "mime_type": "image/png"} in first_in[0]["parts"]
    assert "heron" in chats[0].attributes["gen_ai.system_instructions"]
    first_out = json.loads(chats[0].attributes["gen_ai.output.messages"])
    assert first_out[0]["finish_reason"] == "tool_use"
    assert first_out[0]["parts"][-1] == {"type": "tool_call", "id": "toolu_C", "name": "calculator",
                                         "arguments": {"expression": "6*7"}}
    assert "marmot" in chats[1].attributes["gen_ai.output.messages"]
    second_in = chats[1].attributes["gen_ai.input.messages"]
    assert '"type":"tool_call_response","id":"toolu_C","response":"42"' in second_in
    tool = one(capture_spans, "execute_tool calculator")
    assert json.loads(tool.attributes["gen_ai.tool.call.arguments"]) == {"expression": "6*7"}
    assert tool.attributes["gen_ai.tool.call.result"] == "42"
    everything = json.dumps([{**dict(s.attributes), "name": s.name} for s in capture_spans.get_finished_spans()],
                            default=str)
    for secret in (KEY, UPSTREAM_KEY, png[10:40]):
        assert secret not in everything


# -- the facade's pieces -------------------------------------------------------------------------
def test_link_current_takes_only_a_valid_traceparent(spans):
    span = tracing._tracer.start_span("x")
    token = tracing._context.attach(tracing._trace.set_span_in_context(span))
    try:
        for bad in ("", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", "01-ab-cd-01"):
            assert not tracing.link_current(bad, "t")
        assert tracing.link_current("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "t")
    finally:
        tracing._context.detach(token)
        span.end()
    [link] = span.links
    assert format(link.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.traceparent(span) == f"00-{format(span.context.trace_id, '032x')}-" \
                                         f"{format(span.context.span_id, '016x')}-{int(span.context.trace_flags):02x}"


def test_tool_spans_end_when_the_batch_is_cancelled(spans):
    parent = tracing._tracer.start_span("turn")

    async def run_all(calls: list[Any]) -> list[Any]:
        await asyncio.sleep(10)
        return []

    async def main() -> None:
        task = asyncio.ensure_future(tracing.run_tools(parent, [("id1", "slow", {}), ("id2", "slower", {})], run_all))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    parent.end()
    ended = {s.name for s in spans.get_finished_spans()}
    assert {"execute_tool slow", "execute_tool slower"} <= ended


def test_tool_spans_last_each_calls_own_run_time(spans):
    from server.tools.registry import ToolOutcome

    parent = tracing._tracer.start_span("turn")

    async def run_all(calls: list[Any]) -> list[Any]:
        await asyncio.sleep(0.3)
        return [ToolOutcome("id1", "fast", "3", False, {}, "ok", 0.01),
                ToolOutcome("id2", "slow", "tool 'slow' timed out after 0.2 s", True, {}, "timeout", 0.2)]

    asyncio.run(tracing.run_tools(parent, [("id1", "fast", {}), ("id2", "slow", {})], run_all))
    parent.end()
    by_name = {s.name: s for s in spans.get_finished_spans()}
    fast, slow = by_name["execute_tool fast"], by_name["execute_tool slow"]
    assert fast.start_time == slow.start_time and fast.parent.span_id == parent.get_span_context().span_id
    assert fast.end_time - fast.start_time == 10_000_000 and slow.end_time - slow.start_time == 200_000_000
    assert fast.status.is_ok and slow.attributes["error.type"] == "timeout"


def test_content_parts_never_carry_image_or_document_bytes_or_urls():
    image_url = {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png?sig=SECRET"}}
    document = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0"}}
    parts = tracing._parts([image_url, document, {"type": "redacted_thinking", "data": "opaque"}])
    assert parts == [{"type": "blob", "modality": "image", "mime_type": None},
                     {"type": "document", "modality": "document", "mime_type": "application/pdf"},
                     {"type": "redacted_thinking"}]
    assert tracing._parts("plain") == [{"type": "text", "content": "plain"}]


def test_json_lines_carry_the_trace_id_when_tracing(spans):
    record = logging.LogRecord("server.x", logging.INFO, __file__, 1, "hello", None, None)
    assert "trace_id" not in json.loads(logs.JsonFormatter().format(record))
    span = tracing._tracer.start_span("x")
    token = tracing._context.attach(tracing._trace.set_span_in_context(span))
    try:
        line = json.loads(logs.JsonFormatter().format(record))
    finally:
        tracing._context.detach(token)
        span.end()
    assert line["trace_id"] == format(span.context.trace_id, "032x") == tracing.trace_id(span)


# -- the access log with tracing off, and uvicorn's lines ----------------------------------------
def test_access_lines_without_tracing(app):
    assert not tracing.enabled
    app.upstream.script({"text": "plain"})
    raw, _ = stream_turn(app.client, {"message": "x"}, "unit-off")
    r = app.client.get("/sessions/AAAAAAAAAAAAAAAAAAAAAA?access_token=SECRET-VALUE&x=1",
                       headers={**AUTH, "X-Request-ID": "unit-404"})
    assert r.status_code == 404
    r2 = app.client.get("/health?ticket=SECRET-TICKET", headers={"X-Request-ID": "unit-health"})
    lines = {f["request_id"]: f for f in app.access.fields()}
    assert lines["unit-off"]["bytes"] == len(raw) and "trace_id" not in lines["unit-off"]
    assert lines["unit-404"] | {"path": "/sessions/AAAAAAAAAAAAAAAAAAAAAA", "route": "/sessions/{session_id}",
                                "status": 404, "bytes": len(r.content)} == lines["unit-404"]
    assert lines["unit-health"]["bytes"] == len(r2.content) and "principal" not in lines["unit-health"]
    text = "\n".join(json.dumps(x) for x in app.access.json())
    assert "SECRET" not in text and KEY not in text
    assert all(x["logger"] == "server.access" and x["msg"].startswith(("GET ", "POST ")) for x in app.access.json())


def test_uvicorn_websocket_handshake_lines_lose_their_query_or_go():
    def record(msg: str, *args: Any) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, msg, args, None)

    accepted = record('%s - "WebSocket %s" [accepted]', "127.0.0.1:5", "/agent/ws?hint=x&ticket=T")
    assert logs.redact_record(accepted) is False
    refused = record('%s - "WebSocket %s" %d', "127.0.0.1:5", "/agent/ws?ticket=T&hint=x", 401)
    assert logs.redact_record(refused) is True and refused.getMessage() == '127.0.0.1:5 - "WebSocket /agent/ws" 401'
    closed = record('%s - "WebSocket %s" 403', "127.0.0.1:5", "/api/chat/ws?key=K")
    assert logs.redact_record(closed) is True and closed.getMessage() == '127.0.0.1:5 - "WebSocket /api/chat/ws" 403'


def test_the_startup_line_names_the_collector_without_credentials():
    assert tracing._endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:pw@otel.example:4318/base?key=K"}) == \
        "https://otel.example:4318/base"
    both = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4318/v1/traces"}
    assert tracing._endpoint(both) == "http://b:4318/v1/traces"


def test_a_clients_baggage_is_not_kept(spans):
    seen = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        from opentelemetry import baggage

        seen["baggage"] = dict(baggage.get_all())
        seen["span"] = tracing._trace.get_current_span().get_span_context()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    from server.middleware import RequestContext

    client = TestClient(RequestContext(app))  # (no lifespan: the stub app only speaks HTTP)
    r = client.get("/x", headers={"baggage": "user=alice,secret=1",
                                  "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    assert r.status_code == 200 and seen["baggage"] == {}
    assert format(seen["span"].trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
