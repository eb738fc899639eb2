"""Prometheus metrics (`GET /metrics`), correct across uvicorn workers.

One process: prometheus-client's in-memory registry. Several workers: its multiprocess mode,
where every worker writes its samples to memory-mapped files in `PROMETHEUS_MULTIPROC_DIR`
and a scrape on any worker merges them all. That directory must be the same for every
worker of one server and empty when the server starts:

- `python -m server` (scripts/run) creates a fresh one before uvicorn spawns the workers
  (`prepare_supervisor`), or wipes the one given in `PROMETHEUS_MULTIPROC_DIR`;
- a worker of `uvicorn --workers N` started directly (Procfile, Dockerfile) with no
  `PROMETHEUS_MULTIPROC_DIR` uses `$TMPDIR/agent-metrics-<supervisor pid>-<its start time>`:
  uvicorn *spawns* its workers (fresh interpreters, not forks), so they agree on it through
  their common parent; a new supervisor starts from zero.

The environment variable must be set before prometheus-client is imported (it picks its value
class at import), so this module decides first and imports it afterwards. Gauges of live
things (streams, sockets) use `livesum`; a worker's gauge files are dropped when it stops
(`worker_stopped`) and, for workers that died without stopping, at the next scrape.

Nothing here runs per token: a handful of counter updates per turn and per request.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from . import metrics_dir

MULTIPROC_DIR = metrics_dir.worker_dir()

# Imported only now: prometheus-client reads PROMETHEUS_MULTIPROC_DIR at import time.
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge,  # noqa: E402
                               Histogram, generate_latest, multiprocess)
from prometheus_client import values as _values  # noqa: E402

if MULTIPROC_DIR and _values.ValueClass.__name__ != "MmapedValue":
    _values.ValueClass = _values.get_value_class()  # imported earlier by someone else

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "WS"})

http_requests = Counter("agent_http_requests", "HTTP requests and WebSocket handshakes by route, method "
                        "and status.", ["method", "route", "status"])
turns_started = Counter("agent_turns_started", "Turns started.")
turns = Counter("agent_turns", "Finished turns by outcome (completed, cancelled, failed, interrupted, "
                "server_restarting).", ["outcome"])
active_streams = Gauge("agent_active_sse_streams", "Open Server-Sent Events responses by route.", ["route"],
                       multiprocess_mode="livesum")
active_websockets = Gauge("agent_active_websockets", "Open WebSocket connections by route.", ["route"],
                          multiprocess_mode="livesum")
time_to_first_token = Histogram("agent_time_to_first_token_seconds", "From turn start to the first text "
                                "token.", buckets=(.05, .1, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60))
turn_duration = Histogram("agent_turn_duration_seconds", "Turn duration by outcome.", ["outcome"],
                          buckets=(.1, .25, .5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600))
tokens = Counter("agent_tokens", "Tokens by model and kind (input, output, cache_read, cache_write).",
                 ["model", "kind"])
cost_usd = Counter("agent_cost_usd", "Estimated spend in USD by model.", ["model"])
upstream_requests = Counter("agent_upstream_requests", "HTTP requests sent to the model API, retries "
                            "included.")
upstream_retries = Counter("agent_upstream_retries", "Requests to the model API that were SDK retries.")
upstream_errors = Counter("agent_upstream_errors", "Turns failed by the model API, by our error code.",
                          ["code"])
rate_limited_total = Counter("agent_rate_limited", "Requests rejected by our own rate limiter.", ["scope"])


# -- hooks called from the rest of the server (one line each at the call site) ---------------
def turn_started() -> None:
    turns_started.inc()


def first_token(seconds: float) -> None:
    time_to_first_token.observe(seconds)


def turn_finished(outcome: str, model: str, seconds: float, usage: Any, cost: float) -> None:
    turns.labels(outcome).inc()
    turn_duration.labels(outcome).observe(seconds)
    for kind, value in (("input", usage.input_tokens), ("output", usage.output_tokens),
                        ("cache_read", usage.cache_read_input_tokens),
                        ("cache_write", usage.cache_creation_input_tokens)):
        if value:
            tokens.labels(model, kind).inc(value)
    if cost:
        cost_usd.labels(model).inc(cost)


def upstream_error(code: str) -> None:
    if code != "internal":  # our own bug, not the model service's (counted in agent_turns)
        upstream_errors.labels(code).inc()


def rate_limited(scope: str = "principal") -> None:
    """For the rate limiter: one rejected request (`scope`: what was limited, e.g. principal, ip)."""
    rate_limited_total.labels(scope).inc()


def http_request(method: str, route: str, status: int) -> None:
    http_requests.labels(method if method in _METHODS else "OTHER", route, str(status)).inc()


async def on_upstream_request(request: Any) -> None:
    """httpx event hook on the SDK's client: the SDK numbers its attempts in a header."""
    upstream_requests.inc()
    try:
        if int(request.headers.get("x-stainless-retry-count") or 0) > 0:
            upstream_retries.inc()
    except ValueError:
        pass


def instrumented_http_client(client_class: Any, **kwargs: Any) -> Any:
    """An SDK http client (`anthropic.DefaultAsyncHttpxClient`) counting requests and retries."""
    hooks = kwargs.pop("event_hooks", {}) or {}
    hooks = {**hooks, "request": [*hooks.get("request", []), on_upstream_request]}
    return client_class(event_hooks=hooks, **kwargs)


def worker_stopped() -> None:
    """At worker shutdown: its live gauges no longer count."""
    if MULTIPROC_DIR:
        multiprocess.mark_process_dead(os.getpid(), MULTIPROC_DIR)


# -- exposition ------------------------------------------------------------------------------
def _reap_dead_workers() -> None:
    """Workers killed without a shutdown left live-gauge files: mark them dead."""
    assert MULTIPROC_DIR
    pids = set()
    for path in glob.glob(os.path.join(MULTIPROC_DIR, "gauge_live*_*.db")):
        match = re.search(r"_(\d+)\.db$", path)
        if match:
            pids.add(int(match.group(1)))
    for pid in pids:
        if pid != os.getpid() and not metrics_dir.alive(pid):
            multiprocess.mark_process_dead(pid, MULTIPROC_DIR)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type (sync: file reads; run it in a thread)."""
    if not MULTIPROC_DIR:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    _reap_dead_workers()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, MULTIPROC_DIR)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def metrics_endpoint(request: Any) -> Any:
    """`GET /metrics` (a plain function: Starlette runs it in its thread pool)."""
    from starlette.responses import Response

    body, content_type = render()
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
