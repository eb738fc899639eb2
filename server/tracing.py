"""OpenTelemetry traces (README "Tracing"): the one module that imports `opentelemetry`.

Off unless the standard environment asks for it: `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set, `OTEL_SDK_DISABLED` not "true" and
`OTEL_TRACES_EXPORTER` not "none". Off, nothing from `opentelemetry` is imported: callers test
`tracing.enabled` (a module attribute) or a span they hold (`None`), and the hot path (text
deltas) never reaches this module. On, `setup()` (at worker startup: each uvicorn worker has its
own provider) builds the SDK's TracerProvider from the environment (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`) with a BatchSpanProcessor and the
OTLP exporter (HTTP/protobuf; gRPC when `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL=grpc` and its
package is installed), which reads the endpoint, headers, timeout and compression itself.

Spans (GenAI semantic conventions), parented through context variables: the middleware makes
the request's span current, and a turn's task, created inside it, inherits it.

    POST /agent/stream | WS /agent/ws  (SERVER)    -> WS /agent/ws message (SERVER)
      invoke_agent agent-server  (INTERNAL: the turn; ends when the turn ends, whoever follows it)
        chat {model}             (CLIENT: one model call)
        execute_tool {tool}      (INTERNAL: one tool call; server tools: a zero-length span)
        commit_turn              (CLIENT: the store's commit)

A turn's span context goes into its `turn_start` event (`traceparent`), so a follower on any
worker (a resume, an idempotent retry) links its own span to the turn's. Prompt and answer
text are recorded only with `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`; never
headers, keys, tickets or query strings (`url.path` only).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Awaitable, Callable, Iterator, Mapping, Sequence

log = logging.getLogger("server.tracing")

SERVICE_NAME = "claude-agent-server"
AGENT_NAME = "agent-server"
TURN_SPAN = "invoke_agent " + AGENT_NAME
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_CAPTURE_ON = frozenset({"true", "1", "yes", "on", "span_only", "span_and_event"})
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

enabled = False  # set by setup(): read as `tracing.enabled`, never imported by value
capture_content = False  # OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT
NOOP = nullcontext()  # the shared do-nothing context manager (reentrant)

# Bound by setup(), only when enabled (no opentelemetry import otherwise).
_provider: Any = None
_tracer: Any = None
_trace: Any = None  # opentelemetry.trace
_context: Any = None  # opentelemetry.context
_propagate: Any = None  # opentelemetry.propagate
_baggage: Any = None  # opentelemetry.baggage
_SERVER = _CLIENT = _INTERNAL = None  # SpanKind members
_ERROR: Any = None  # StatusCode.ERROR


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OTEL_* environment asks for traces (no import needed to tell)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())


def setup(settings: Any = None, env: Mapping[str, str] | None = None, exporter: Any = None) -> bool:
    """At worker startup: the tracer provider and exporter, when the environment wants traces.
    Idempotent; returns `enabled`. (`exporter`: a test's span exporter, called as each span ends.)"""
    global enabled, capture_content, _provider, _tracer, _trace, _context, _propagate, _baggage
    global _SERVER, _CLIENT, _INTERNAL, _ERROR
    if enabled or not (exporter is not None or wanted(env)):
        return enabled
    env = os.environ if env is None else env
    try:
        from opentelemetry import baggage, context, propagate, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace import SpanKind, StatusCode
    except ImportError as exc:  # (requirements.txt installs them: a broken image, not a reason to stop)
        log.error("tracing asked for (OTEL_EXPORTER_OTLP_*) but the OpenTelemetry SDK is missing (%s): "
                  "no traces", exc)
        return False

    resource = Resource.create({})  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(SimpleSpanProcessor(exporter) if exporter is not None
                                else BatchSpanProcessor(_exporter(env)))  # (OTEL_BSP_* tune it)
    _provider, _tracer = provider, provider.get_tracer("server", _version())
    _trace, _context, _propagate, _baggage = trace, context, propagate, baggage
    _SERVER, _CLIENT, _INTERNAL, _ERROR = SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL, StatusCode.ERROR
    capture_content = env.get(CAPTURE_ENV, "").strip().lower() in _CAPTURE_ON
    enabled = True
    log.info("tracing on: OTLP to %s, service %s%s", _endpoint(env) if exporter is None else "a test exporter",
             resource.attributes.get("service.name"),
             "; prompt and answer text recorded" if capture_content else "")
    return True


def _exporter(env: Mapping[str, str]) -> Any:
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()}
    if exporters - {"otlp"}:
        log.warning("OTEL_TRACES_EXPORTER=%s: only otlp is supported here; exporting over OTLP",
                    env.get("OTEL_TRACES_EXPORTER"))
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc, not "
                        "installed: exporting over OTLP HTTP/protobuf instead (point the endpoint at port 4318)")
        else:
            return GrpcExporter()
    elif protocol != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported: using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*


def _endpoint(env: Mapping[str, str]) -> str:
    """Where spans go, for the startup line (without what could hold a secret)."""
    from .logs import url_without_secrets  # (logs imports this module)

    return url_without_secrets(
        (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip())


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("opentelemetry-sdk")
    except Exception:  # noqa: BLE001 — only a label
        return ""


def shutdown() -> None:
    """At worker shutdown: export what is buffered (blocking: call it in a thread) and stop."""
    global enabled, _provider
    if _provider is None:
        return
    provider, _provider, enabled = _provider, None, False
    try:
        provider.shutdown()  # (flushes the batch processor; bounded by the exporter's timeout)
    except Exception:  # noqa: BLE001 — never fail a shutdown over telemetry
        log.warning("tracing: flushing spans at shutdown failed", exc_info=True)


def force_flush(timeout_ms: int = 5000) -> bool:
    """Export what is buffered now (tests)."""
    return bool(_provider is not None and _provider.force_flush(timeout_ms))


# -- ids ----------------------------------------------------------------------------------
def current_trace_id() -> str | None:
    """The current span's trace id (32 hex) for log lines and exemplars; None when off or none."""
    return trace_id(_trace.get_current_span()) if enabled else None


def trace_id(span: Any) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def traceparent(span: Any) -> str | None:
    """The span's W3C `traceparent` (kept with a turn, in its turn_start event)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _set_error(span: Any, error_type: str, description: str | None = None) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(_ERROR, description or error_type)


# -- HTTP requests and WebSockets (middleware.py, transports/forward.py) --------------------
def start_request(scope: Mapping[str, Any], request_id: str) -> tuple[Any, Any]:
    """A SERVER span for an HTTP request or a WebSocket connection, child of an incoming
    `traceparent`, made current for the app. Named by the method until the route is known."""
    http = scope["type"] == "http"
    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
    # The caller's trace context (OTEL_PROPAGATORS: W3C traceparent/tracestate by default), not its
    # baggage: a client's entries must not ride along on what the server sends (the model API's calls).
    parent = _baggage.clear(_propagate.extract(carrier))
    method = scope.get("method", "GET")
    attributes = {"http.request.method": method, "url.path": scope.get("path", ""),
                  "url.scheme": scope.get("scheme", "http" if http else "ws"), "agent.request_id": request_id}
    span = _tracer.start_span(method if http else "WS", context=parent, kind=_SERVER, attributes=attributes)
    token = _context.attach(_trace.set_span_in_context(span, parent))
    return span, token


def end_request(handle: tuple[Any, Any], websocket: bool, method: str, route: str | None, status: int | None,
                exc: BaseException | None = None) -> None:
    span, token = handle
    try:
        if route is not None:
            span.update_name(f"{'WS' if websocket else method} {route}")
            span.set_attribute("http.route", route)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if exc is not None:
            _set_error(span, type(exc).__qualname__)
        elif status is not None and status >= 500:
            _set_error(span, str(status))
    finally:
        _context.detach(token)
        span.end()


@contextmanager
def ws_message(route: str, request_id: str | None) -> Iterator[Any]:
    """A SERVER span per WebSocket frame received (child of the connection's span), current
    while the frame is handled: the turn a `message`/`send` frame starts is its child."""
    span = _tracer.start_span(f"WS {route} message", kind=_SERVER,
                              attributes={"http.route": route, "agent.request_id": request_id or ""})
    token = _context.attach(_trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as exc:
        if not _is_disconnect(exc):
            _set_error(span, type(exc).__qualname__)
        raise
    finally:
        _context.detach(token)
        span.end()


def _is_disconnect(exc: BaseException) -> bool:
    return type(exc).__name__ == "WebSocketDisconnect"


def annotate(key: str, value: Any) -> None:
    """An attribute on the current span (e.g. a WebSocket frame's type)."""
    _trace.get_current_span().set_attribute(key, value)


def record_error(code: str) -> None:
    """The current span failed with our error `code` (a WebSocket frame answered with an error)."""
    _set_error(_trace.get_current_span(), code)


# -- turns (engine.py) ---------------------------------------------------------------------
def start_turn(session_id: str, turn_id: str, model: str, principal: str) -> Any:
    """The turn's span, child of the current (request or message) span. Not made current
    here: the turn's task does that (`activate`), so its context is the task's own."""
    return _tracer.start_span(TURN_SPAN, kind=_INTERNAL, attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": AGENT_NAME,
        "gen_ai.conversation.id": session_id, "gen_ai.request.model": model,
        "agent.turn_id": turn_id, "agent.principal": principal})


def activate(span: Any) -> None:
    """Make `span` current for the rest of this task (a turn's own context: never detached)."""
    _context.attach(_trace.set_span_in_context(span))


def end_turn(span: Any, outcome: str, error_code: str | None) -> None:
    span.set_attribute("agent.outcome", outcome)
    if error_code is not None and outcome != "cancelled":
        _set_error(span, error_code)
    span.end()


def link_current(parent_traceparent: str, turn_id: str) -> bool:
    """Link the current span (a resume, an idempotent retry) to a turn's span."""
    found = _TRACEPARENT.fullmatch(parent_traceparent or "")
    if found is None:
        return False
    trace_id_, span_id, flags = (int(g, 16) for g in found.groups())
    if not trace_id_ or not span_id:
        return False
    linked = _trace.SpanContext(trace_id_, span_id, is_remote=True, trace_flags=_trace.TraceFlags(flags))
    _trace.get_current_span().add_link(linked, {"agent.turn_id": turn_id, "agent.link": "follows_turn"})
    return True


def end_span(span: Any, error_code: str | None = None, attributes: Mapping[str, Any] | None = None) -> None:
    """End a span (a model call the turn's failure interrupted), with our error code if any."""
    if attributes:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if error_code is not None:
        _set_error(span, error_code)
    span.end()


# -- model calls -----------------------------------------------------------------------------
def start_model_call(parent: Any, params: Mapping[str, Any]) -> Any:
    model = params["model"]
    attributes: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                                  "gen_ai.request.model": model, "gen_ai.request.max_tokens": params["max_tokens"]}
    if capture_content:
        attributes["gen_ai.input.messages"] = _dumps([_message(m) for m in params["messages"]])
        if system := params.get("system"):
            attributes["gen_ai.system_instructions"] = _dumps(_parts(system))
    return _tracer.start_span(f"chat {model}", context=_trace.set_span_in_context(parent), kind=_CLIENT,
                              attributes=attributes)


def model_call_result(span: Any, started: float, request_id: str | None, message: Mapping[str, Any] | None,
                      usage: Any, stop_reason: str | None, first_chunk_at: float | None,
                      blocks: Sequence[Mapping[str, Any]] | None) -> None:
    """What the call's events said (message_start, message_delta), set once as it ends (or fails)."""
    attributes: dict[str, Any] = {
        "gen_ai.usage.input_tokens": usage.input_tokens, "gen_ai.usage.output_tokens": usage.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": usage.cache_read_input_tokens,
        "gen_ai.usage.cache_creation.input_tokens": usage.cache_creation_input_tokens,
    }
    if request_id:
        attributes["anthropic.request_id"] = request_id
    if message:
        if isinstance(message.get("id"), str):
            attributes["gen_ai.response.id"] = message["id"]
        if isinstance(message.get("model"), str):
            attributes["gen_ai.response.model"] = message["model"]
    if stop_reason:
        attributes["gen_ai.response.finish_reasons"] = [stop_reason]
    if first_chunk_at is not None:
        attributes["gen_ai.response.time_to_first_chunk"] = max(0.0, first_chunk_at - started)
    if capture_content and blocks is not None:
        output = {"role": "assistant", "parts": [_part(b) for b in blocks]}
        if stop_reason:
            output["finish_reason"] = stop_reason
        attributes["gen_ai.output.messages"] = _dumps([output])
    span.set_attributes(attributes)


# -- tools -----------------------------------------------------------------------------------
async def run_tools(parent: Any, calls: list[tuple[str, str, object]],
                    run_all: Callable[[list[tuple[str, str, object]]], Awaitable[list[Any]]]) -> list[Any]:
    """`run_all(calls)` with an `execute_tool` span per call, children of the turn. The calls run
    concurrently from the batch's start, so each span starts there and lasts its own run time
    (`ToolOutcome.seconds`): built once the batch is done (or cancelled), with explicit timestamps."""
    started = time.time_ns()
    context = _trace.set_span_in_context(parent)

    def span_of(call_id: str, name: str, raw_input: object) -> Any:
        attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
                      "gen_ai.tool.call.id": call_id, "gen_ai.tool.type": "function"}
        if capture_content:
            attributes["gen_ai.tool.call.arguments"] = _dumps(raw_input)
        return _tracer.start_span(f"execute_tool {name}", context=context, kind=_INTERNAL, attributes=attributes,
                                  start_time=started)

    try:
        results = await run_all(calls)
    except BaseException:  # (cancelled with the turn: the calls end now)
        for call in calls:
            span = span_of(*call)
            _set_error(span, "cancelled")
            span.end()
        raise
    for call, result in zip(calls, results):
        span = span_of(*call)
        if capture_content:
            span.set_attribute("gen_ai.tool.call.result", str(result.output))
        if result.is_error:
            _set_error(span, result.outcome)
        span.end(end_time=started + int(result.seconds * 1e9))
    return results


def server_tool(parent: Any, name: str, call_id: str | None, is_error: bool, content: Any) -> None:
    """A server tool (run by the API within the model call): a zero-length span from its result block."""
    now = time.time_ns()
    attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
                  "gen_ai.tool.call.id": call_id or "", "gen_ai.tool.type": "server"}
    if capture_content:
        attributes["gen_ai.tool.call.result"] = _dumps(content)
    span = _tracer.start_span(f"execute_tool {name}", context=_trace.set_span_in_context(parent), kind=_INTERNAL,
                              attributes=attributes, start_time=now)
    if is_error:
        code = content.get("error_code") if isinstance(content, dict) else None
        _set_error(span, code if isinstance(code, str) and code else "error")
    span.end(end_time=now)


# -- the commit ------------------------------------------------------------------------------
@contextmanager
def commit(parent: Any, system: str) -> Iterator[Any]:
    span = _tracer.start_span("commit_turn", context=_trace.set_span_in_context(parent), kind=_CLIENT,
                              attributes={"db.system.name": system, "db.operation.name": "commit_turn"})
    try:
        yield span
    except BaseException as exc:
        _set_error(span, _store_error(exc))
        raise
    finally:
        span.end()


def commit_lost(span: Any) -> None:
    """The commit found the session lock gone: nothing was written."""
    _set_error(span, "interrupted", "the session lock expired before the commit")


def _store_error(exc: BaseException) -> str:
    from .errors import ApiError, store_unavailable

    if isinstance(exc, ApiError):
        return exc.code
    if store_unavailable(exc):
        return "store_unavailable"
    return type(exc).__qualname__


# -- content capture (opt-in) ---------------------------------------------------------------
def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A Messages API message as a GenAI semconv message (`role`, `parts`)."""
    return {"role": message.get("role"), "parts": _parts(message.get("content"))}


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    if isinstance(content, list):
        return [_part(b) for b in content if isinstance(b, Mapping)]
    return []


def _part(block: Mapping[str, Any]) -> dict[str, Any]:
    """One content block as a semconv part. Images and documents: their kind and media type
    only (never their bytes or URL, which could carry a signed query string)."""
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "content": block.get("text", "")}
    if kind == "thinking":
        return {"type": "reasoning", "content": block.get("thinking", "")}
    if kind in ("tool_use", "server_tool_use"):
        return {"type": "tool_call", "id": block.get("id"), "name": block.get("name"), "arguments": block.get("input")}
    if kind == "tool_result" or (isinstance(kind, str) and kind.endswith("_tool_result")):
        return {"type": "tool_call_response", "id": block.get("tool_use_id"), "response": block.get("content")}
    if kind in ("image", "document"):
        source = block.get("source")
        media_type = source.get("media_type") if isinstance(source, Mapping) else None
        return {"type": "blob" if kind == "image" else kind, "modality": kind, "mime_type": media_type}
    return {"type": str(kind)}
