"""A small OTLP/HTTP trace receiver for the tests: what an OpenTelemetry collector would see.

    collector = OtlpCollector().start()       # 127.0.0.1, a free port, a daemon thread
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, ...}
    ...
    spans = collector.wait_for(lambda s: s["name"] == "commit_turn" and s["trace_id"] == tid)
    tree = collector.tree(tid)
    collector.stop()

It answers `POST /v1/traces` (`application/x-protobuf`, optionally gzip-compressed) with 200 and
an empty `ExportTraceServiceResponse`, decoding the body with the official protobuf definitions
(`opentelemetry-proto`: `ExportTraceServiceRequest`), and keeps every span as a plain dict:

    {"trace_id": 32 hex, "span_id": 16 hex, "parent_span_id": 16 hex or "", "name": str,
     "kind": "SERVER" | "CLIENT" | "INTERNAL" | "PRODUCER" | "CONSUMER" | "UNSPECIFIED",
     "attributes": {key: str | int | float | bool | list | dict | bytes},
     "status": {"code": "UNSET" | "OK" | "ERROR", "message": str},
     "links": [{"trace_id", "span_id", "trace_state", "attributes"}],
     "events": [{"name", "time_ns", "attributes"}],
     "resource": {key: value}, "scope": instrumentation scope name,
     "start_ns": int, "end_ns": int, "trace_state": str, "flags": int}

The raw request bodies are kept too (`raw`; `exports` says which services each came from), so a
test can search the bytes that left the server.
The protobuf modules are imported when the collector starts, not when this module is imported
(a test process that imports it must not count as one that imported opentelemetry).
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

Span = dict[str, Any]

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def any_value(v: Any) -> Any:
    """An OTLP AnyValue as the Python value it carries."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def attributes(kvs: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def decode(body: bytes) -> list[Span]:
    """The spans of one ExportTraceServiceRequest body."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[Span] = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append({
                    "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(), "name": s.name,
                    "kind": KINDS.get(s.kind, str(s.kind)),
                    "attributes": attributes(s.attributes),
                    "status": {"code": STATUS.get(s.status.code, str(s.status.code)), "message": s.status.message},
                    "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex(),
                               "trace_state": link.trace_state, "attributes": attributes(link.attributes)}
                              for link in s.links],
                    "events": [{"name": e.name, "time_ns": e.time_unix_nano, "attributes": attributes(e.attributes)}
                               for e in s.events],
                    "resource": resource, "scope": ss.scope.name,
                    "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                    "trace_state": s.trace_state, "flags": s.flags,
                })
    return spans


def all_strings(value: Any) -> Iterable[str]:
    """Every string (and decoded bytes) inside an attribute value, recursively."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("utf-8", "replace")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from all_strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from all_strings(v)
    elif value is not None:
        yield str(value)


def span_strings(span: Span) -> Iterable[tuple[str, str]]:
    """(where, text) for everything a span says: name, attributes, status, events, links, resource."""
    yield "name", span["name"]
    yield "status.message", span["status"]["message"]
    for key, value in span["attributes"].items():
        for text in all_strings(value):
            yield f"attributes[{key}]", text
    for i, event in enumerate(span["events"]):
        yield f"events[{i}].name", event["name"]
        for key, value in event["attributes"].items():
            for text in all_strings(value):
                yield f"events[{i}].attributes[{key}]", text
    for i, link in enumerate(span["links"]):
        for key, value in link["attributes"].items():
            for text in all_strings(value):
                yield f"links[{i}].attributes[{key}]", text
    for key, value in span["resource"].items():
        for text in all_strings(value):
            yield f"resource[{key}]", text


class OtlpCollector:
    """The receiver. Thread-safe: the HTTP server runs in its own thread(s)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.spans: list[Span] = []
        self.raw: list[bytes] = []  # every export body, as received (after decompression)
        self.exports: list[dict[str, Any]] = []  # per export: {"services": set, "body": bytes, "spans": n}
        self.requests = 0
        self.errors: list[str] = []  # bodies or requests it could not take (answered 4xx)
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The base URL for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends /v1/traces)."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> "OtlpCollector":
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # fail here if missing

        collector = self
        empty_response = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's requests.Session expects

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _answer(self, status: int, body: bytes = b"", ctype: str = "application/x-protobuf") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path.split("?", 1)[0] != "/v1/traces":
                    collector._error(f"POST {self.path}: not /v1/traces")
                    return self._answer(404, b"not found", "text/plain")
                ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
                if ctype != "application/x-protobuf":
                    collector._error(f"unsupported content type {ctype!r}")
                    return self._answer(415, b"application/x-protobuf only", "text/plain")
                encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    spans = decode(body)
                except Exception as exc:  # noqa: BLE001 - a bad body is the test's finding
                    collector._error(f"undecodable body ({encoding or 'identity'}, {len(body)} B): {exc!r}")
                    return self._answer(400, b"bad request", "text/plain")
                collector._add(body, spans)
                self._answer(200, empty_response)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(405, b"POST /v1/traces", "text/plain")

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-collector", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "OtlpCollector":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _add(self, body: bytes, spans: list[Span]) -> None:
        with self._cond:
            self.requests += 1
            self.raw.append(body)
            self.exports.append({"services": {s["resource"].get("service.name") for s in spans},
                                 "body": body, "spans": len(spans)})
            self.spans.extend(spans)
            self._cond.notify_all()

    def _error(self, what: str) -> None:
        with self._cond:
            self.errors.append(what)
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self.spans.clear()
            self.raw.clear()
            self.exports.clear()
            self.errors.clear()
            self.requests = 0

    # -- queries -------------------------------------------------------------------------------
    def snapshot(self) -> list[Span]:
        with self._cond:
            return list(self.spans)

    def find(self, name: str | None = None, *, trace_id: str | None = None, service: str | None = None,
             where: Callable[[Span], bool] | None = None, **attrs: Any) -> list[Span]:
        """Spans matching every given criterion, in start order. `attrs`: attribute key (with
        dots written as "__": http__route="/x" -> "http.route") -> exact value."""
        wanted = {k.replace("__", "."): v for k, v in attrs.items()}
        out = [s for s in self.snapshot()
               if (name is None or s["name"] == name)
               and (trace_id is None or s["trace_id"] == trace_id)
               and (service is None or s["resource"].get("service.name") == service)
               and all(s["attributes"].get(k) == v for k, v in wanted.items())
               and (where is None or where(s))]
        return sorted(out, key=lambda s: (s["start_ns"], s["end_ns"]))

    def wait_for(self, predicate: Callable[[list[Span]], Any], timeout: float = 10.0) -> Any:
        """Wait until predicate(all spans so far) is truthy; return its value. On timeout raise
        AssertionError listing what arrived (names per trace), for a readable test failure."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(list(self.spans))
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
        raise AssertionError(f"timed out after {timeout} s waiting for spans; received:\n{self.describe()}")

    def wait_span(self, name: str | None = None, *, count: int = 1, timeout: float = 10.0, **criteria: Any) -> list[Span]:
        """Wait until at least `count` spans match `find(name, **criteria)`; return them (start order)."""
        return self.wait_for(lambda _: (found if len(found := self.find(name, **criteria)) >= count else None),
                             timeout=timeout)

    def trace(self, trace_id: str) -> list[Span]:
        return self.find(trace_id=trace_id)

    def by_id(self, span_id: str) -> Span | None:
        return next((s for s in self.snapshot() if s["span_id"] == span_id), None)

    def children(self, span: Span) -> list[Span]:
        return self.find(trace_id=span["trace_id"], where=lambda s: s["parent_span_id"] == span["span_id"])

    def tree(self, trace_id: str) -> list[dict[str, Any]]:
        """The trace as nested {"span": span, "children": [...]} (roots: spans whose parent is
        not in the trace, e.g. the caller's span of an incoming traceparent)."""
        spans = self.trace(trace_id)
        ids = {s["span_id"] for s in spans}
        nodes = {s["span_id"]: {"span": s, "children": []} for s in spans}
        roots = []
        for s in spans:
            node = nodes[s["span_id"]]
            if s["parent_span_id"] and s["parent_span_id"] in ids:
                nodes[s["parent_span_id"]]["children"].append(node)
            else:
                roots.append(node)
        return roots

    def render(self, trace_id: str) -> str:
        """The trace as an indented outline (for failure messages)."""
        lines: list[str] = []

        def walk(node: dict[str, Any], depth: int) -> None:
            s = node["span"]
            ms = (s["end_ns"] - s["start_ns"]) / 1e6
            lines.append(f"{'  ' * depth}{s['name']} [{s['kind']}] {s['span_id']} "
                         f"({s['resource'].get('service.name')}, {ms:.1f} ms)")
            for child in node["children"]:
                walk(child, depth + 1)

        for root in self.tree(trace_id):
            walk(root, 0)
        return "\n".join(lines)

    def describe(self) -> str:
        by_trace: dict[str, list[str]] = {}
        for s in self.snapshot():
            by_trace.setdefault(s["trace_id"], []).append(f"{s['name']}({s['resource'].get('service.name')})")
        out = [f"{tid}: {', '.join(names)}" for tid, names in by_trace.items()]
        if self.errors:
            out.append(f"collector errors: {self.errors}")
        return "\n".join(out[-40:]) or "(no spans)"
