"""One Redis connection shared by every caller of the hot commands.

Redis answers a connection's commands in order, so concurrent callers can share one: each
writes its encoded commands in one go and waits for as many replies, which a reader task
hands out first in, first out. That saves a pool checkout per call (lock, health check,
timers) and sends concurrent turns' commands in fewer writes.

A caller that stops waiting (cancelled with its turn) leaves its replies to be read and
dropped, so the order holds. A connection that fails or does not answer within `timeout`
fails every caller waiting on it and is replaced by the next call, as is one idle longer
than `max_idle` (a NAT or a proxy may have dropped it silently).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


@dataclass(slots=True)
class _Call:
    waiter: asyncio.Future[list[Any]]
    count: int
    sent_at: float
    replies: list[Any] = field(default_factory=list)


class CommandChannel:
    def __init__(self, pool: ConnectionPool, *, timeout: float, max_idle: float = 30.0) -> None:
        self._pool = pool
        self._timeout = timeout
        self._max_idle = max_idle
        self._conn: AbstractConnection | None = None
        self._calls: deque[_Call] = deque()
        self._tasks: list[asyncio.Task[None]] = []  # the reader and the watchdog of `_conn`
        self._connecting: asyncio.Lock | None = None
        self._closing: set[asyncio.Future[None]] = set()
        self._last_used = 0.0

    async def execute(self, commands: list[bytes]) -> list[Any]:
        """Send encoded commands in one write and return their replies, an error reply as
        its `ResponseError` (not raised). Raises redis' ConnectionError or TimeoutError."""
        now = time.monotonic()
        conn = self._conn
        if conn is None or not conn.is_connected or now - self._last_used > self._max_idle:
            conn = await self._connect(now)
        self._last_used = now
        call = _Call(asyncio.get_running_loop().create_future(), len(commands), now)
        self._calls.append(call)  # (appended and written in one step: the order of the replies)
        try:
            await conn.send_packed_command(b"".join(commands), check_health=False)
        except BaseException as exc:  # a failed (or interrupted) write: the connection is unusable
            call.waiter.cancel()
            if self._conn is conn:
                self._drop(exc if isinstance(exc, RedisConnectionError)
                           else RedisConnectionError(f"Redis write failed: {exc!r}"))
            raise
        return await call.waiter

    async def close(self) -> None:
        self._drop(RedisConnectionError("the store is closing"))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- the connection ---------------------------------------------------------------------
    async def _connect(self, now: float) -> AbstractConnection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            conn = self._conn
            if conn is not None and conn.is_connected and now - self._last_used <= self._max_idle:
                return conn  # another caller connected meanwhile
            self._drop(RedisConnectionError("replaced"))
            # No socket timeout on the connection: reads wait for the reader task, and the
            # watchdog bounds how long a caller waits. No health checks either (replacing an
            # idle connection does their job): they cost a clock read per reply.
            conn = self._pool.connection_class(**{**self._pool.connection_kwargs, "socket_timeout": None,
                                                  "health_check_interval": 0})
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.connect()  # (AUTH, SELECT, TLS as the URL says)
            except TimeoutError:
                await conn.disconnect(nowait=True)
                raise RedisTimeoutError("Timeout connecting to Redis") from None
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            self._conn, self._last_used = conn, now
            self._tasks = [asyncio.create_task(self._read(conn), name="redis-channel-reader"),
                           asyncio.create_task(self._watch(conn), name="redis-channel-watchdog")]
            return conn

    def _drop(self, exc: Exception) -> None:
        """Fail everyone waiting on the current connection and forget it."""
        conn, self._conn = self._conn, None
        calls, self._calls = self._calls, deque()
        for call in calls:
            if not call.waiter.done():
                call.waiter.set_exception(exc)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._tasks = []
        if conn is not None:  # (a nowait disconnect only closes the socket)
            closing = asyncio.ensure_future(conn.disconnect(nowait=True))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _read(self, conn: AbstractConnection) -> None:
        calls = self._calls
        try:
            while True:
                try:
                    reply = await conn.read_response(disable_decoding=True, timeout=math.inf,
                                                     disconnect_on_error=False)
                except ResponseError as exc:
                    reply = exc
                if not calls:
                    raise RedisConnectionError("a reply nobody asked for")
                call = calls[0]
                call.replies.append(reply)
                if len(call.replies) == call.count:
                    calls.popleft()
                    if not call.waiter.done():  # (a caller that gave up: dropped)
                        call.waiter.set_result(call.replies)
        except Exception as exc:  # noqa: BLE001 — the connection is gone: tell every caller
            if self._conn is conn:
                self._drop(exc if isinstance(exc, RedisConnectionError)
                           else RedisConnectionError(f"Redis connection failed: {exc!r}"))

    async def _watch(self, conn: AbstractConnection) -> None:
        """Fail the callers of a connection whose oldest command waits longer than `timeout`."""
        interval = min(1.0, self._timeout / 4)
        while self._conn is conn:
            await asyncio.sleep(interval)
            if self._calls and time.monotonic() - self._calls[0].sent_at > self._timeout:
                self._drop(RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s"))

