"""Building and tearing down a worker's components, and draining on SIGTERM.

SIGTERM (a deploy, `fly deploy`, Ctrl-C under a supervisor): stop taking turns, give the
running ones `GRACEFUL_SHUTDOWN_SECONDS`, then stop them with a retryable
`server_restarting` event; only then is uvicorn told to shut down (it closes WebSockets with
1012 at once, so telling it first would cut the sockets following those turns).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from contextlib import asynccontextmanager
from typing import AsyncIterator

import anthropic

from . import metrics
from .config import Settings
from .engine import Engine
from .fake_anthropic import FakeAnthropic
from .store.base import Store
from .store.memory import MemoryStore
from .store.redis import RedisStore
from .tools import load_toolset
from .upstream_transport import make_http_client
from .usage import PriceTable

log = logging.getLogger("server.lifecycle")

# Young-generation threshold for the cyclic GC (CPython's default is 700). Streaming
# allocates a few small dicts/strings per event; at 400 streams the default thresholds
# spent ~11% of the worker's CPU in collections (most of it scanning long-lived objects
# again and again); with the startup heap frozen and this threshold, under 1%.
GC_YOUNG_THRESHOLD = 50_000
_gc_tuned = False
# After a drain that had turns: time for their followers to write the terminal event before
# uvicorn closes the sockets (a local follower needs a few loop iterations).
FOLLOWER_FLUSH_SECONDS = 0.25


def make_store(settings: Settings) -> Store:
    if settings.redis_url:
        return RedisStore(settings.redis_url, session_ttl=settings.session_ttl_seconds,
                          lock_ttl=settings.turn_lock_ttl_seconds, log_ttl=settings.event_log_ttl_seconds,
                          log_maxlen=settings.event_log_maxlen, idempotency_ttl=settings.idempotency_ttl_seconds)
    return MemoryStore(session_ttl=settings.session_ttl_seconds, lock_ttl=settings.turn_lock_ttl_seconds,
                       log_ttl=settings.event_log_ttl_seconds, log_maxlen=settings.event_log_maxlen,
                       idempotency_ttl=settings.idempotency_ttl_seconds)


@asynccontextmanager
async def components(settings: Settings) -> AsyncIterator[Engine]:
    fake: FakeAnthropic | None = None
    base_url, api_key = settings.anthropic_base_url, settings.anthropic_api_key
    if settings.offline:
        fake = FakeAnthropic(pace_ms=settings.offline_pace_ms)
        base_url, api_key = await fake.start(), "offline-model"
        log.warning("OFFLINE MODE: ANTHROPIC_API_KEY is not set; answers come from the bundled "
                    "offline model at %s, not from Claude", base_url)
    client = anthropic.AsyncAnthropic(api_key=api_key or "no-key", base_url=base_url,
                                      max_retries=settings.anthropic_max_retries,
                                      timeout=settings.upstream_timeout_seconds,
                                      # asyncio-native socket I/O (upstream_transport); counts
                                      # requests and SDK retries for /metrics
                                      http_client=metrics.instrumented_http_client(
                                          make_http_client, timeout=settings.upstream_timeout_seconds))
    store = make_store(settings)
    engine = Engine(settings, client, store, load_toolset(settings.enabled_tools),
                    PriceTable(settings.model_prices))
    await store.start(engine.on_cancel_signal)
    engine.housekeeper.start()
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
        await store.close()
        await client.close()
        if fake is not None:
            await fake.stop()
        metrics.worker_stopped()


def _tune_gc() -> None:
    """Once per process, after startup: move everything alive now (modules, the SDK's
    models, settings) out of the collector's sight, and collect young objects less often.
    Objects are still freed by reference counting the moment they are dropped; only
    cyclic garbage waits a little longer."""
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _drain_on_sigterm(engine: Engine, grace: float):
    """Drain first, then hand SIGTERM to uvicorn; returns an undo function.

    uvicorn's shutdown waits for HTTP responses in progress (SSE) but closes every WebSocket
    with 1012 within ~0.1 s, and its lifespan shutdown then stops whatever still runs. So the
    signal reaches uvicorn only once the drain is over: no new turns from the first moment
    (`/ready` says so; a new turn gets 503 `server_restarting`), running turns (whatever
    transport started them) get `grace` seconds, and their followers (SSE or WebSocket) get
    the last event; then uvicorn stops listening and closes the connections (1012). A
    repeated SIGTERM (a supervisor relaying it) changes nothing; SIGINT goes to uvicorn."""
    loop = asyncio.get_running_loop()
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:  # not the main thread (e.g. under a test runner's thread)
        return lambda: None
    tasks: list[asyncio.Task[None]] = []
    signalled = False

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

    def on_sigterm(signum, frame):  # type: ignore[no-untyped-def]
        nonlocal signalled
        if signalled:
            return
        signalled = True
        log.info("SIGTERM: draining (grace %.0f s)", grace)
        loop.call_soon_threadsafe(lambda: tasks.append(loop.create_task(drain_then_exit(signum))))

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:
        return lambda: None

    def restore() -> None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except (ValueError, TypeError):
            pass

    return restore


def _dump_tasks_on_sigusr1() -> None:
    """`kill -USR1 <worker>` logs every asyncio task's stack: what a stuck worker waits on."""
    loop = asyncio.get_running_loop()

    def dump() -> None:
        import io

        for task in asyncio.all_tasks(loop):
            out = io.StringIO()
            task.print_stack(file=out)
            log.warning("task %s\n%s", task.get_name(), out.getvalue())

    try:
        loop.add_signal_handler(signal.SIGUSR1, dump)
    except (NotImplementedError, RuntimeError, ValueError):
        pass
