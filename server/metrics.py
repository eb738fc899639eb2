"""Prometheus metrics (`GET /metrics`), correct across uvicorn workers.

One process: prometheus-client's in-memory registry. Several workers: its multiprocess mode,
files in one directory (`PROMETHEUS_MULTIPROC_DIR`) merged by a scrape on any worker. Every
worker of one server uses the same directory, empty when the server starts: `python -m server`
prepares it before uvicorn starts the workers (`prepare_supervisor`); the workers of a bare
`uvicorn --workers N` (Procfile, Dockerfile) given none agree on
`$TMPDIR/agent-metrics-w-<supervisor pid>-<its start time>` through their common parent, so a
new supervisor starts from zero.
Importing this module touches no file: `setup()` picks the mode and creates the metrics at
worker startup (the engine calls it; so does the first metric used). Live gauges (streams,
sockets) use `livesum`; a worker's are dropped when it stops, or at the next scrape if it died.
Nothing here runs per token: a few counter updates per turn and per request."""

from __future__ import annotations

import atexit
import glob
import multiprocessing
import os
import re
import shutil
import tempfile
import threading
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, multiprocess)
from prometheus_client import values as _values
from prometheus_client.openmetrics import exposition as openmetrics
from starlette.responses import Response

from . import tracing

ENV = "PROMETHEUS_MULTIPROC_DIR"
_DIR_PREFIX = "agent-metrics-"
MULTIPROC_DIR: str | None = None  # set by setup(); None: the in-memory registry
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "WS"})
_setting_up = threading.Lock()  # (the endpoint runs in a thread)


# -- the multiprocess directory -----------------------------------------------------------
def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux); '' elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().decode(errors="replace").rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _configured() -> str | None:
    """The operator's directory (created). Set but empty (from a copied .env.example) counts as
    unset and is removed: prometheus-client would take its mere presence for multiprocess mode."""
    path = os.environ.get(ENV)
    if path is not None and not path.strip():
        del os.environ[ENV]
        return None
    if path:
        os.makedirs(path, exist_ok=True)
    return path


def _worker_dir() -> str | None:
    """The directory this worker writes to (created), or None for the in-memory registry."""
    if path := _configured():
        return path
    if multiprocessing.parent_process() is None:
        return None  # a single uvicorn process (or a test importing the app)
    ppid = os.getppid()
    base = tempfile.gettempdir()
    path = os.path.join(base, f"{_DIR_PREFIX}w-{ppid}-{_start_time(ppid) or 'x'}")
    for old in glob.glob(os.path.join(base, f"{_DIR_PREFIX}w-*")):  # of supervisors now gone
        match = re.fullmatch(r".*-w-(\d+)-[0-9x]+", old)
        if match and old != path and not _alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ[ENV] = path
    return path


def prepare_supervisor(workers: int) -> str | None:
    """Before uvicorn starts the workers: one empty directory for them (the operator's, wiped,
    or for several workers a fresh temporary one, removed at exit)."""
    if path := _configured():
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
        return path
    if workers <= 1:
        return None
    path = tempfile.mkdtemp(prefix=_DIR_PREFIX + "main-")
    os.environ[ENV] = path
    atexit.register(shutil.rmtree, path, True)
    return path


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
        self.upstream_retries = Counter("agent_upstream_retries", "Requests to the model API that were SDK retries.")
        self.upstream_errors = Counter("agent_upstream_errors", "Turns failed by the model API, by our error code.",
                                       ["code"])
        self.rate_limited = Counter("agent_rate_limited", "Requests rejected by our own rate limiter.", ["scope"])
        self.tool_calls = Counter("agent_tool_calls", "Tool calls by tool and outcome (ok, error, timeout, invalid; "
                                  "server tools: ok or error).", ["tool", "outcome"])
        self.tool_duration = Histogram("agent_tool_duration_seconds", "Tool run time by tool (the tools this server "
                                       "runs).", ["tool"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5,
                                                                    10, 30, 60))
        # Each worker has its own connection to each MCP server: the merged value is 1 only when every
        # live worker's is up.
        self.mcp_server_up = Gauge("agent_mcp_server_up", "MCP servers (MCP_SERVERS) by name: 1 when this "
                                   "server's connection is up (in every worker), else 0.", ["server"],
                                   multiprocess_mode="livemin")
        self.store_retries = Counter("agent_store_retries", "Hot Redis commands sent again after a node failed "
                                     "or redirected them (a failover, a restart, a resharding).")
        self.store_unreplicated = Counter("agent_store_unreplicated_commits", "Commits that reached fewer "
                                          "replicas than REDIS_WAIT_REPLICAS in time (a failover could lose them).")


_metrics: Metrics | None = None


def setup() -> Metrics:
    """Once per process, at worker startup (and by the first hook called before it): choose
    the registry and create the metrics."""
    global _metrics, MULTIPROC_DIR
    if _metrics is None:
        with _setting_up:
            if _metrics is None:
                MULTIPROC_DIR = _worker_dir()
                # prometheus-client picked its value class when imported; the variable may have changed since.
                _values.ValueClass = _values.get_value_class()
                _metrics = Metrics()
    return _metrics


# -- hooks called from the rest of the server (one line each at the call site) ---------------
def turn_started() -> None:
    setup().turns_started.inc()


def _exemplar() -> dict[str, str] | None:
    """The current trace as a latency sample's exemplar (OpenMetrics; kept by the in-memory registry
    only: prometheus-client's multiprocess mode has no exemplars, so several workers show none)."""
    trace_id = tracing.current_trace_id() if tracing.enabled else None
    return {"trace_id": trace_id} if trace_id else None


def first_token(seconds: float) -> None:
    setup().time_to_first_token.observe(seconds, _exemplar())


def turn_finished(outcome: str, model: str, seconds: float, usage: Any, cost: float) -> None:
    m = setup()
    m.turns.labels(outcome).inc()
    m.turn_duration.labels(outcome).observe(seconds, _exemplar())
    model_usage(model, usage, cost)


def model_usage(model: str, usage: Any, cost: float) -> None:
    """Tokens and spend of a turn's model calls, or of a call outside a turn (a title)."""
    m = setup()
    for kind, value in (("input", usage.input_tokens), ("output", usage.output_tokens),
                        ("cache_read", usage.cache_read_input_tokens),
                        ("cache_write", usage.cache_creation_input_tokens)):
        if value:
            m.tokens.labels(model, kind).inc(value)
    if cost:
        m.cost_usd.labels(model).inc(cost)


def tool_finished(tool: str, outcome: str, seconds: float | None = None) -> None:
    """One tool call ended; `seconds` for the tools this server runs (a server tool's run time is not known)."""
    m = setup()
    m.tool_calls.labels(tool, outcome).inc()
    if seconds is not None:
        m.tool_duration.labels(tool).observe(seconds, _exemplar())


def mcp_server_up(server: str, up: bool) -> None:
    """An MCP server's connection came up or went down (server/tools/mcp.py)."""
    setup().mcp_server_up.labels(server).set(1 if up else 0)


def store_retry() -> None:
    setup().store_retries.inc()


def store_replication_lagged() -> None:
    setup().store_unreplicated.inc()


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


def instrumented_http_client(client_class: Any, **kwargs: Any) -> Any:
    """An SDK http client (`anthropic.DefaultAsyncHttpxClient`) counting requests and retries
    (built at worker startup: sets the metrics up). The SDK numbers its attempts in a header."""
    m = setup()

    async def on_upstream_request(request: Any) -> None:
        m.upstream_requests.inc()
        try:
            if int(request.headers.get("x-stainless-retry-count") or 0) > 0:
                m.upstream_retries.inc()
        except ValueError:
            pass

    hooks = kwargs.pop("event_hooks", {}) or {}
    hooks = {**hooks, "request": [*hooks.get("request", []), on_upstream_request]}
    return client_class(event_hooks=hooks, **kwargs)


def worker_stopped() -> None:
    """At worker shutdown: its live gauges no longer count."""
    if MULTIPROC_DIR:
        multiprocess.mark_process_dead(os.getpid(), MULTIPROC_DIR)


def metrics_endpoint(request: Any) -> Any:
    """`GET /metrics`: a plain function, so Starlette runs it (file reads) in its thread pool. A scraper
    that asks for OpenMetrics (Prometheus does, to store exemplars) gets it, exemplars included."""
    setup()
    registry = REGISTRY
    if MULTIPROC_DIR:
        # Workers killed without a shutdown left live-gauge files: mark them dead.
        pids = {int(m[1]) for path in glob.glob(os.path.join(MULTIPROC_DIR, "gauge_live*_*.db"))
                if (m := re.search(r"_(\d+)\.db$", path))}
        for pid in pids - {os.getpid()}:
            if not _alive(pid):
                multiprocess.mark_process_dead(pid, MULTIPROC_DIR)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, MULTIPROC_DIR)
    if "application/openmetrics-text" in request.headers.get("accept", ""):
        return Response(openmetrics.generate_latest(registry), headers={
            "Content-Type": openmetrics.CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST,
                                                        "Cache-Control": "no-store"})
