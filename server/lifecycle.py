"""Building and tearing down a worker's components; the SIGTERM drain; SIGUSR1 task dump; GC tuning."""

from __future__ import annotations

import asyncio
import functools
import gc
import io
import logging
import signal
from contextlib import asynccontextmanager, suppress
from typing import AsyncIterator

import anthropic
from redis.exceptions import RedisError

from . import metrics, tracing
from .config import Settings, redis_tls_options
from .engine import Engine
from .logs import url_without_secrets
from .store.memory import MemoryStore
from .store.redis import RedisStore
from .tools import load_toolset
from .upstream_transport import make_http_client
from .usage import PriceTable

log = logging.getLogger("server.lifecycle")

# Young-generation threshold for the cyclic GC (CPython's default is 700): streaming allocates
# a few small objects per event, and the default collects (and rescans long-lived objects) often.
GC_YOUNG_THRESHOLD = 50_000
# After a drain that had turns: time for their followers to write the terminal event before
# uvicorn closes the sockets (a local follower needs a few loop iterations).
FOLLOWER_FLUSH_SECONDS = 0.25


@asynccontextmanager
async def components(settings: Settings) -> AsyncIterator[Engine]:
    tracing.setup(settings)  # (this worker's own tracer provider, when OTEL_* asks for traces)
    fake = None
    base_url, api_key = settings.anthropic_base_url, settings.anthropic_api_key
    if settings.offline:
        from .fake_anthropic import FakeAnthropic  # only the offline model needs the fake API

        fake = FakeAnthropic(pace_ms=settings.offline_pace_ms)
        base_url, api_key = await fake.start(), "offline-model"
        log.warning("OFFLINE MODE: ANTHROPIC_API_KEY is not set; answers come from the bundled "
                    "offline model at %s, not from Claude", base_url)
    client = anthropic.AsyncAnthropic(api_key=api_key or "no-key", base_url=base_url,
                                      max_retries=settings.anthropic_max_retries,
                                      timeout=settings.upstream_timeout_seconds,
                                      http_client=metrics.instrumented_http_client(  # our transport, counted
                                          make_http_client, timeout=settings.upstream_timeout_seconds))
    retention = dict(session_ttl=settings.session_ttl_seconds, lock_ttl=settings.turn_lock_ttl_seconds,
                     log_ttl=settings.event_log_ttl_seconds, log_maxlen=settings.event_log_maxlen,
                     idempotency_ttl=settings.idempotency_ttl_seconds)
    store = RedisStore(settings.redis_url, cluster=settings.redis_cluster, tls=redis_tls_options(settings),
                       wait_replicas=settings.redis_wait_replicas, **retention) \
        if settings.redis_url else MemoryStore(**retention)
    tools = load_toolset(settings.enabled_tools, settings.tool_modules, settings.tool_timeout_seconds)
    mcp_servers = None
    if settings.mcp_servers:  # (only then is the `mcp` SDK imported)
        from .tools.mcp import McpServers

        mcp_servers = McpServers.from_settings(settings)
        tools = tools.with_sources(mcp_servers)
    engine = Engine(settings, client, store, tools,
                    PriceTable(settings.model_prices, settings.web_search_price_per_1k))
    engine.mcp_servers = mcp_servers  # (for /ready)
    try:
        await store.start(engine.on_notice)
    except (RedisError, OSError) as exc:  # the worker cannot start: say why in one line, first
        log.error("cannot use Redis at %s (%s: %s); check REDIS_URL%s", url_without_secrets(settings.redis_url or ""),
                  type(exc).__name__, exc, " and REDIS_TLS_*" if (settings.redis_url or "").startswith("rediss:") else "")
        raise
    engine.housekeeper.start()
    if mcp_servers is not None:  # connected before the first turn (bounded by MCP_CONNECT_TIMEOUT_SECONDS)
        await mcp_servers.start()
    if not settings.redis_url:
        log.warning("sessions are kept in memory (REDIS_URL is not set): they vanish on restart")
    restore = _drain_on_sigterm(engine, settings.graceful_shutdown_seconds)
    _dump_tasks_on_sigusr1()
    _tune_gc()
    try:
        yield engine
    finally:
        restore()
        await engine.drain(0 if not engine.accepting else settings.graceful_shutdown_seconds)
        await engine.housekeeper.stop()
        if mcp_servers is not None:
            await mcp_servers.close()
        await store.close()
        await client.close()
        if fake is not None:
            await fake.stop()
        metrics.worker_stopped()
        if tracing.enabled:  # the spans still buffered (a blocking export: not in the loop)
            await asyncio.to_thread(tracing.shutdown)


@functools.cache  # once per process
def _tune_gc() -> None:
    """After startup: freeze what is alive now (modules, the SDK's models, settings) out of the
    collector's sight, and collect young objects less often (only cyclic garbage waits longer:
    reference counting still frees the rest at once)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _drain_on_sigterm(engine: Engine, grace: float):
    """Drain first, then hand SIGTERM to uvicorn (which closes WebSockets at once); returns
    an undo function. From the signal on, no new turns (`/ready` says so, a new turn gets
    503 `server_restarting`); running turns get `grace` seconds and their followers the last
    event. A repeated SIGTERM changes nothing; SIGINT goes to uvicorn."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    tasks: list[asyncio.Task[None]] = []  # (the one drain: a repeated SIGTERM changes nothing)

    async def drain_then_exit(signum: int) -> None:
        try:
            busy = bool(engine.turns)
            await engine.drain(grace)
            if busy:  # the turns' followers write their last event before uvicorn closes them
                await asyncio.sleep(FOLLOWER_FLUSH_SECONDS)
        finally:
            log.info("drained: shutting down")
            if callable(previous):
                previous(signum, None)

    def start_drain(signum: int) -> None:  # (in the loop, not in the signal handler)
        if not tasks:
            log.info("SIGTERM: draining (grace %.0f s)", grace)
            tasks.append(loop.create_task(drain_then_exit(signum)))

    try:
        signal.signal(signal.SIGTERM, lambda signum, _frame: loop.call_soon_threadsafe(start_drain, signum))
    except ValueError:  # not the main thread (e.g. under a test runner's thread)
        return lambda: None

    def restore() -> None:
        with suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous)

    return restore


def _dump_tasks_on_sigusr1() -> None:
    """`kill -USR1 <worker>` logs every asyncio task's stack: what a stuck worker waits on."""

    def dump() -> None:  # (called in the loop)
        for task in asyncio.all_tasks():
            out = io.StringIO()
            task.print_stack(file=out)
            log.warning("task %s\n%s", task.get_name(), out.getvalue())

    with suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)
