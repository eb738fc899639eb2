"""Prometheus metrics (`GET /metrics`), correct across uvicorn workers.

One process: prometheus-client's in-memory registry. Several workers: its multiprocess mode
(files in one directory, see metrics_dir.py), merged by a scrape on any worker. Importing
this module touches no file: `setup()` picks the mode and creates the metrics at worker
startup (the engine calls it; so does the first metric used). Live gauges (streams, sockets)
use `livesum`; a worker's are dropped when it stops, or at the next scrape if it died.
Nothing here runs per token: a few counter updates per turn and per request.
"""

from __future__ import annotations

import glob
import os
import re
import threading
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, multiprocess)
from prometheus_client import values as _values

from . import metrics_dir

MULTIPROC_DIR: str | None = None  # set by setup(); None: the in-memory registry
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "WS"})
_setting_up = threading.Lock()  # (render() runs in a thread)


class Metrics:
    """The metric objects, created once the registry is chosen."""

    def __init__(self) -> None:
        self.http_requests = Counter("agent_http_requests", "HTTP requests and WebSocket handshakes by route, "
                                     "method and status.", ["method", "route", "status"])
        self.turns_started = Counter("agent_turns_started", "Turns started.")
        self.turns = Counter("agent_turns", "Finished turns by outcome (completed, cancelled, failed, "
                             "interrupted, server_restarting).", ["outcome"])
        self.active_streams = Gauge("agent_active_sse_streams", "Open Server-Sent Events responses by route.",
                                    ["route"], multiprocess_mode="livesum")
        self.active_websockets = Gauge("agent_active_websockets", "Open WebSocket connections by route.",
                                       ["route"], multiprocess_mode="livesum")
        self.time_to_first_token = Histogram("agent_time_to_first_token_seconds", "From turn start to the "
                                             "first text token.", buckets=(.05, .1, .2, .3, .5, .75, 1, 1.5,
                                                                           2, 3, 5, 8, 13, 20, 30, 60))
        self.turn_duration = Histogram("agent_turn_duration_seconds", "Turn duration by outcome.", ["outcome"],
                                       buckets=(.1, .25, .5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600))
        self.tokens = Counter("agent_tokens", "Tokens by model and kind (input, output, cache_read, "
                              "cache_write).", ["model", "kind"])
        self.cost_usd = Counter("agent_cost_usd", "Estimated spend in USD by model.", ["model"])
        self.upstream_requests = Counter("agent_upstream_requests", "HTTP requests sent to the model API, "
                                         "retries included.")
        self.upstream_retries = Counter("agent_upstream_retries", "Requests to the model API that were SDK "
                                        "retries.")
        self.upstream_errors = Counter("agent_upstream_errors", "Turns failed by the model API, by our error "
                                       "code.", ["code"])
        self.rate_limited = Counter("agent_rate_limited", "Requests rejected by our own rate limiter.", ["scope"])


_metrics: Metrics | None = None


def setup() -> Metrics:
    """Once per process, at worker startup (and by the first hook called before it): choose
    the registry and create the metrics."""
    global _metrics, MULTIPROC_DIR
    if _metrics is None:
        with _setting_up:
            if _metrics is None:
                MULTIPROC_DIR = metrics_dir.worker_dir()
                # prometheus-client picked its value class when imported; the variable may have changed since.
                _values.ValueClass = _values.get_value_class()
                _metrics = Metrics()
    return _metrics


# -- hooks called from the rest of the server (one line each at the call site) ---------------
def turn_started() -> None:
    setup().turns_started.inc()


def first_token(seconds: float) -> None:
    setup().time_to_first_token.observe(seconds)


def turn_finished(outcome: str, model: str, seconds: float, usage: Any, cost: float) -> None:
    m = setup()
    m.turns.labels(outcome).inc()
    m.turn_duration.labels(outcome).observe(seconds)
    for kind, value in (("input", usage.input_tokens), ("output", usage.output_tokens),
                        ("cache_read", usage.cache_read_input_tokens),
                        ("cache_write", usage.cache_creation_input_tokens)):
        if value:
            m.tokens.labels(model, kind).inc(value)
    if cost:
        m.cost_usd.labels(model).inc(cost)


def upstream_error(code: str) -> None:
    if code != "internal":  # our own bug, not the model service's (counted in agent_turns)
        setup().upstream_errors.labels(code).inc()


def rate_limited(scope: str = "principal") -> None:
    """For the rate limiter: one rejected request (`scope`: what was limited, e.g. principal, ip)."""
    setup().rate_limited.labels(scope).inc()


def http_request(method: str, route: str, status: int) -> None:
    setup().http_requests.labels(method if method in _METHODS else "OTHER", route, str(status)).inc()


def live_connection(websocket: bool, route: str) -> Any:
    """The live gauge child of an open WebSocket or SSE response on `route` (inc/dec it)."""
    m = setup()
    return (m.active_websockets if websocket else m.active_streams).labels(route)


async def on_upstream_request(request: Any) -> None:
    """httpx event hook on the SDK's client: the SDK numbers its attempts in a header."""
    m = setup()
    m.upstream_requests.inc()
    try:
        if int(request.headers.get("x-stainless-retry-count") or 0) > 0:
            m.upstream_retries.inc()
    except ValueError:
        pass


def instrumented_http_client(client_class: Any, **kwargs: Any) -> Any:
    """An SDK http client (`anthropic.DefaultAsyncHttpxClient`) counting requests and retries
    (built at worker startup: sets the metrics up)."""
    setup()
    hooks = kwargs.pop("event_hooks", {}) or {}
    hooks = {**hooks, "request": [*hooks.get("request", []), on_upstream_request]}
    return client_class(event_hooks=hooks, **kwargs)


def worker_stopped() -> None:
    """At worker shutdown: its live gauges no longer count."""
    if MULTIPROC_DIR:
        multiprocess.mark_process_dead(os.getpid(), MULTIPROC_DIR)


# -- exposition ------------------------------------------------------------------------------
def render() -> tuple[bytes, str]:
    """The exposition text and its content type (sync: file reads; run it in a thread)."""
    setup()
    if not MULTIPROC_DIR:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    # Workers killed without a shutdown left live-gauge files: mark them dead.
    pids = {int(m[1]) for path in glob.glob(os.path.join(MULTIPROC_DIR, "gauge_live*_*.db"))
            if (m := re.search(r"_(\d+)\.db$", path))}
    for pid in pids - {os.getpid()}:
        if not metrics_dir.alive(pid):
            multiprocess.mark_process_dead(pid, MULTIPROC_DIR)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, MULTIPROC_DIR)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def metrics_endpoint(request: Any) -> Any:
    """`GET /metrics` (a plain function: Starlette runs it in its thread pool)."""
    from starlette.responses import Response

    body, content_type = render()
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
