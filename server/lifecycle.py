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
from typing import TYPE_CHECKING, AsyncIterator

import anthropic

from . import metrics
from .config import Settings
from .engine import Engine
from .store.base import Store
from .store.memory import MemoryStore
from .store.redis import RedisStore
from .tools import load_toolset
from .upstream_transport import make_http_client
from .usage import PriceTable

if TYPE_CHECKING:
    from .fake_anthropic import FakeAnthropic

log = logging.getLogger("server.lifecycle")

# Young-generation threshold for the cyclic GC (CPython's default is 700): streaming allocates
# a few small objects per event, and the default collects (and rescans long-lived objects) often.
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
        from .fake_anthropic import FakeAnthropic  # only the offline model needs the fake API

        fake = FakeAnthropic(pace_ms=settings.offline_pace_ms)
        base_url, api_key = await fake.start(), "offline-model"
        log.warning("OFFLINE MODE: ANTHROPIC_API_KEY is not set; answers come from the bundled "
                    "offline model at %s, not from Claude", base_url)
    client = anthropic.AsyncAnthropic(api_key=api_key or "no-key", base_url=base_url,
                                      max_retries=settings.anthropic_max_retries,
                                      timeout=settings.upstream_timeout_seconds,
                                      # our transport, counting requests and retries for /metrics
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
    """Once per process, after startup: freeze what is alive now (modules, the SDK's models,
    settings) out of the collector's sight, and collect young objects less often (only
    cyclic garbage waits longer: reference counting still frees the rest at once)."""
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _drain_on_sigterm(engine: Engine, grace: float):
    """Drain first, then hand SIGTERM to uvicorn (which closes WebSockets at once); returns
    an undo function. From the signal on, no new turns (`/ready` says so, a new turn gets
    503 `server_restarting`); running turns get `grace` seconds and their followers the last
    event. A repeated SIGTERM changes nothing; SIGINT goes to uvicorn."""
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
