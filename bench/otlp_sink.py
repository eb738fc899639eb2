"""A minimal OTLP/HTTP trace sink for `scripts/bench --tracing`: it runs in a thread of the bench
process (not counted as server CPU) and answers every `POST /v1/traces` with 200 and an empty
ExportTraceServiceResponse, counting export requests, bytes and spans (decoded with the official
protobuf definitions when opentelemetry-proto is installed, which the server's OTLP exporter
pulls in). Nothing is kept.
"""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OtlpSink:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.spans = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OtlpSink":
        try:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                                  ExportTraceServiceResponse)
            empty = ExportTraceServiceResponse().SerializeToString()
        except ImportError:  # counting requests and bytes only
            ExportTraceServiceRequest, empty = None, b""
        sink = self

        def count_spans(body: bytes) -> int:
            if ExportTraceServiceRequest is None:
                return 0
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                wire = len(body)
                ok = self.path.split("?", 1)[0] == "/v1/traces"
                spans = 0
                if ok:
                    try:
                        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
                            body = gzip.decompress(body)
                        spans = count_spans(body)
                    except Exception:  # noqa: BLE001 - counted, answered 400
                        ok = False
                with sink._lock:
                    sink.requests += 1
                    sink.bytes += wire
                    sink.spans += spans
                    sink.errors += not ok
                answer = empty if ok else b""
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True).start()
        return self

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "bytes": self.bytes, "spans": self.spans, "errors": self.errors}

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
