"""The hot commands' path to Redis (begin, commit, event-log flush): hand-encoded commands
written on one shared connection per Redis node, in one write per caller.

`SingleRouter` talks to one Redis. `ClusterRouter` talks to a Redis Cluster: one shared
connection per master, each command sent to the master of its key's slot (redis-py's cluster
client keeps the slot map), and a node that fails or answers MOVED/ASK/TRYAGAIN/CLUSTERDOWN
(a failover, a resharding) is retried on a refreshed map for up to `retry_for` seconds. That
retry is safe because every hot command is idempotent: a begin, commit, renewal or log entry
that did run answers the same when run again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, RedisClusterException, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import metrics

log = logging.getLogger("server.store")

# Replies that mean "not here, or not now": the slot moved, the cluster is electing, the
# server is loading its data after a restart. (MovedError is an AskError.)
_REDIRECTS = (AskError, TryAgainError, ClusterDownError)
_NODE_FAILURES = (RedisConnectionError, RedisClusterException)


def _commands(groups: list[tuple[bytes, list[bytes]]], indexes: list[int]) -> list[bytes]:
    """The commands of the groups at `indexes`, in order: what one write to a node carries."""
    return [command for i in indexes for command in groups[i][1]]


def _not_now(reply: Any) -> bool:
    return isinstance(reply, _REDIRECTS) or isinstance(reply, ResponseError) and str(reply).startswith("LOADING")


class Router:
    """Where the hot commands go. Groups of commands, each touching one key's slot, are
    sent in one write per node; a group whose node failed (a refused or broken connection,
    not a timeout: an unresponsive Redis already took `timeout`) or answered "not now" is
    sent again, after `_recover`, until `retry_for` seconds have passed."""

    def __init__(self, *, retry_for: float) -> None:
        self._retry_for = retry_for

    async def execute(self, key: bytes, commands: list[bytes], *, holding: bool = False) -> list[Any]:
        """Commands that all touch `key`'s slot: their replies (error replies as values).
        `holding`: the commands hold their connection (WAIT): send them on one of their own."""
        return (await self.execute_groups([(key, commands)], holding=holding))[0]

    async def execute_groups(self, groups: list[tuple[bytes, list[bytes]]], *,
                             holding: bool = False) -> list[list[Any]]:
        """Several (key, commands) groups, in one round trip per node."""
        results: list[list[Any]] = [[] for _ in groups]
        pending = list(range(len(groups)))
        started, delay = time.monotonic(), 0.05
        while True:
            failure: BaseException | None = None
            retry: list[int] = []
            for idx, outcome in await self._send(groups, pending, holding):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, _NODE_FAILURES):
                        raise outcome
                    retry += idx
                    failure = outcome
                    continue
                at = 0
                for i in idx:
                    replies = outcome[at:at + len(groups[i][1])]
                    at += len(replies)
                    redirect = next((r for r in replies if _not_now(r)), None)
                    if redirect is None:
                        results[i] = replies
                    else:
                        retry.append(i)
                        failure = redirect
            if not retry:
                return results
            if time.monotonic() - started + delay > self._retry_for:
                log.warning("Redis: %d command group(s) failed for %.1f s, giving up (%s: %s)", len(retry),
                            time.monotonic() - started, type(failure).__name__, str(failure)[:200])
                raise failure if isinstance(failure, _NODE_FAILURES) else \
                    RedisConnectionError(f"Redis kept answering {str(failure)[:80]!r}")
            metrics.store_retry()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            await self._recover(time.monotonic())
            pending = retry

    async def _send(self, groups: list[tuple[bytes, list[bytes]]], pending: list[int],
                    holding: bool) -> list[tuple[list[int], list[Any] | BaseException]]:
        """Send the pending groups: (their indexes, the replies or the failure) per write."""
        raise NotImplementedError

    async def _recover(self, failed_at: float) -> None:
        pass

    def node_of(self, key: bytes) -> str:
        """The node serving `key` now ("" for a single Redis)."""
        return ""

    async def close(self) -> None:
        raise NotImplementedError


class SingleRouter(Router):
    """One Redis: every group in one write on one connection."""

    def __init__(self, channels: "NodeChannels", *, retry_for: float = 2.0) -> None:
        super().__init__(retry_for=retry_for)
        self.channels = channels

    async def _send(self, groups: list[tuple[bytes, list[bytes]]], pending: list[int],
                    holding: bool) -> list[tuple[list[int], list[Any] | BaseException]]:
        try:
            replies: list[Any] | BaseException = await self.channels.execute(_commands(groups, pending), holding)
        except RedisConnectionError as exc:
            replies = exc
        return [(pending, replies)]

    async def close(self) -> None:
        await self.channels.close()


class ClusterRouter(Router):
    """A Redis Cluster: one CommandChannel per master; each call writes once to each master
    it needs, concurrently. A failure reloads the slot map (once for every caller that
    failed before the reload began)."""

    def __init__(self, cluster: RedisCluster, *, timeout: float, retry_for: float = 5.0) -> None:
        super().__init__(retry_for=retry_for)
        self.cluster = cluster
        self._timeout = timeout
        self._channels: dict[str, NodeChannels] = {}
        self._refreshing = asyncio.Lock()  # (bound to no loop until first used)
        self._refreshed_at = 0.0

    async def _send(self, groups: list[tuple[bytes, list[bytes]]], pending: list[int],
                    holding: bool) -> list[tuple[list[int], list[Any] | BaseException]]:
        nodes = self.cluster.nodes_manager
        if not nodes.slots_cache:
            try:
                await self.cluster.initialize()  # (the client's first slot map)
            except _NODE_FAILURES as exc:
                return [(pending, exc)]
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        try:
            for i in pending:
                node = nodes.get_node_from_slot(key_slot(groups[i][0]))
                by_node.setdefault(node.name, (node, []))[1].append(i)
        except _NODE_FAILURES as exc:  # a slot no master serves (yet)
            return [(pending, exc)]
        outcomes = await asyncio.gather(*(self._channels_of(node).execute(_commands(groups, idx), holding)
                                          for node, idx in by_node.values()), return_exceptions=True)
        for (node, _), outcome in zip(by_node.values(), outcomes):
            if isinstance(outcome, _NODE_FAILURES):  # asked last when the slot map is reloaded
                nodes.move_node_to_end_of_cached_nodes(node.name)
        return [(idx, outcome) for (_, idx), outcome in zip(by_node.values(), outcomes)]

    def node_of(self, key: bytes) -> str:
        try:
            return self.cluster.nodes_manager.get_node_from_slot(key_slot(key)).name
        except _NODE_FAILURES:
            return ""

    def _channels_of(self, node: ClusterNode) -> "NodeChannels":
        channels = self._channels.get(node.name)
        if channels is None:
            channels = self._channels[node.name] = NodeChannels(node.connection_class, node.connection_kwargs,
                                                                timeout=self._timeout)
        return channels

    async def _recover(self, failed_at: float) -> None:
        async with self._refreshing:
            if self._refreshed_at > failed_at:
                return
            self._refreshed_at = time.monotonic()
            try:
                await self.cluster.nodes_manager.initialize()
            except _NODE_FAILURES:
                return  # no node answered yet: the callers retry until their deadline
            masters = {node.name for node in self.cluster.get_primaries()}
            for name in [name for name in self._channels if name not in masters]:
                await self._channels.pop(name).close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class NodeChannels:
    """A node's connections for the hot commands: `shared`, the one they all share, and up to
    `spares` more for commands that hold their connection until they return (a commit's
    WAIT): Redis reads nothing more from a connection while WAIT waits, so on the shared one
    a WAIT would delay every begin, flush and lock renewal behind it."""

    def __init__(self, connection_class: type[AbstractConnection], connection_kwargs: dict[str, Any], *,
                 timeout: float, spares: int = 16) -> None:
        self._new = lambda: CommandChannel(connection_class, connection_kwargs, timeout=timeout)
        self.shared = self._new()
        self._spares: list[CommandChannel] = []
        self._limit = spares

    async def execute(self, commands: list[bytes], holding: bool = False) -> list[Any]:
        """`CommandChannel.execute` on the shared connection, or (`holding`) on a spare."""
        return await (self.holding() if holding else self.shared).execute(commands)

    def holding(self) -> "CommandChannel":
        """An idle spare, a new one, or (all busy, at the limit) the least busy."""
        for channel in self._spares:
            if not channel.pending:
                return channel
        if len(self._spares) < self._limit:
            self._spares.append(self._new())
            return self._spares[-1]
        return min(self._spares, key=lambda channel: channel.pending)

    async def close(self) -> None:
        for channel in (self.shared, *self._spares):
            await channel.close()


class CommandChannel:
    """One Redis connection shared by every caller of the hot commands (begin, commit, flush).

    Redis answers a connection's commands in order, so concurrent callers can share one: each
    writes its encoded commands in one go and waits for as many replies, which a reader task
    hands out first in, first out. That saves a pool checkout per call (lock, health check,
    timers) and sends concurrent turns' commands in fewer writes.

    A caller that stops waiting (cancelled with its turn) leaves its replies to be read and
    dropped, so the order holds. A connection that fails or does not answer within `timeout`
    fails every caller waiting on it and is replaced by the next call, as is one idle longer
    than `max_idle` (a NAT or a proxy may have dropped it silently).
    """
    def __init__(self, connection_class: type[AbstractConnection], connection_kwargs: dict[str, Any], *,
                 timeout: float, max_idle: float = 30.0) -> None:
        # (a pool's or a cluster node's connection class and arguments: AUTH, SELECT, TLS as configured)
        self._connection_class = connection_class
        self._connection_kwargs = connection_kwargs
        self._timeout = timeout
        self._max_idle = max_idle
        self._conn: AbstractConnection | None = None
        self._calls: deque[tuple[asyncio.Future[list[Any]], int, float]] = deque()  # (waiter, replies due, sent at)
        self._tasks: list[asyncio.Task[None]] = []  # the reader and the watchdog of `_conn`
        self._connecting = asyncio.Lock()  # (bound to no loop until first used)
        self._closing: set[asyncio.Future[None]] = set()
        self._last_used = 0.0

    @property
    def pending(self) -> int:
        """Calls waiting for their replies."""
        return len(self._calls)

    async def execute(self, commands: list[bytes]) -> list[Any]:
        """Send encoded commands in one write and return their replies, an error reply as
        its `ResponseError` (not raised). Raises redis' ConnectionError or TimeoutError."""
        now = time.monotonic()
        conn = self._conn
        if conn is None or not conn.is_connected or now - self._last_used > self._max_idle:
            conn = await self._connect(now)
        self._last_used = now
        waiter = asyncio.get_running_loop().create_future()
        self._calls.append((waiter, len(commands), now))  # (appended and written in one step: the order of the replies)
        try:
            await conn.send_packed_command(b"".join(commands), check_health=False)
        except BaseException as exc:  # a failed (or interrupted) write: the connection is unusable
            waiter.cancel()
            if self._conn is conn:
                self._drop(exc if isinstance(exc, RedisConnectionError)
                           else RedisConnectionError(f"Redis write failed: {exc!r}"))
            raise
        return await waiter

    async def close(self) -> None:
        self._drop(RedisConnectionError("the store is closing"))
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _connect(self, now: float) -> AbstractConnection:
        async with self._connecting:
            conn = self._conn
            if conn is not None and conn.is_connected and now - self._last_used <= self._max_idle:
                return conn  # another caller connected meanwhile
            self._drop(RedisConnectionError("replaced"))
            # No socket timeout on the connection: reads wait for the reader task, and the
            # watchdog bounds how long a caller waits. No health checks either (replacing an
            # idle connection does their job): they cost a clock read per reply.
            conn = self._connection_class(**{**self._connection_kwargs, "socket_timeout": None,
                                             "health_check_interval": 0})
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.connect()  # (AUTH, SELECT, TLS as the URL says)
            except BaseException as exc:
                await conn.disconnect(nowait=True)
                if isinstance(exc, TimeoutError):
                    raise RedisTimeoutError("Timeout connecting to Redis") from None
                raise
            self._conn, self._last_used = conn, now
            self._tasks = [asyncio.create_task(self._read(conn), name="redis-channel-reader"),
                           asyncio.create_task(self._watch(conn), name="redis-channel-watchdog")]
            return conn

    def _drop(self, exc: Exception) -> None:
        """Fail everyone waiting on the current connection and forget it."""
        conn, self._conn = self._conn, None
        calls, self._calls = self._calls, deque()
        for waiter, _, _ in calls:
            if not waiter.done():
                waiter.set_exception(exc)
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
        replies: list[Any] = []  # the oldest call's, so far
        try:
            while True:
                try:
                    reply = await conn.read_response(disable_decoding=True, timeout=math.inf,
                                                     disconnect_on_error=False)
                except ResponseError as exc:
                    reply = exc
                if not calls:
                    raise RedisConnectionError("a reply nobody asked for")
                replies.append(reply)
                waiter, count, _ = calls[0]
                if len(replies) == count:
                    calls.popleft()
                    if not waiter.done():  # (a caller that gave up: dropped)
                        waiter.set_result(replies)
                    replies = []
        except Exception as exc:  # noqa: BLE001 — the connection is gone: tell every caller
            if self._conn is conn:
                self._drop(exc if isinstance(exc, RedisConnectionError)
                           else RedisConnectionError(f"Redis connection failed: {exc!r}"))

    async def _watch(self, conn: AbstractConnection) -> None:
        """Fail the callers of a connection whose oldest command waits longer than `timeout`."""
        interval = min(1.0, self._timeout / 4)
        while self._conn is conn:
            await asyncio.sleep(interval)
            if self._calls and time.monotonic() - self._calls[0][2] > self._timeout:
                self._drop(RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s"))

