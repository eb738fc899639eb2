"""An asyncio-native network backend for httpcore2, and the SDK's http client built on it.

Why: httpcore2's default (anyio) backend wraps every socket ``read()`` in
``anyio.fail_after(timeout)`` - a CancelScope with a timer handle, ``current_task()``
look-ups and scope bookkeeping - and anyio's socket stream toggles ``resume_reading`` /
``pause_reading`` around every wait (or checkpoints when data is already there). With
hundreds of paced SSE streams that is paid once per SSE event: ~15-20% of the server's CPU.

Design:

* :class:`AsyncioStream` is both the ``asyncio.Protocol`` (``data_received`` appends to a
  deque of chunks) and httpcore2's ``AsyncNetworkStream``. ``read()`` returns at once when
  data is buffered - no timer, no task look-up, no checkpoint. Otherwise it awaits one
  future that ``data_received`` / ``eof_received`` / ``connection_lost`` resolve.
* Read-side flow control: above ``HIGH_WATER`` buffered bytes the transport is paused
  (``pause_reading``), and resumed once reads drain it below ``LOW_WATER``.
* Timeouts without a per-read timer: a waiting read stores a deadline on its stream and
  registers the stream with a per-loop :class:`_Sweeper`, a single repeating
  ``call_later`` (running only while something waits with a timeout) that fails overdue
  waits every ``sweep_interval`` seconds. **Granularity**: a read/write timeout of ``T``
  fires after ``T`` to ``T + sweep_interval`` seconds (0.5 s by default). Upstream read
  timeouts are minutes long, so half a second of slack does not matter.
* ``write()`` is ``transport.write``; it awaits a drain future only while the transport
  has called ``pause_writing``.
* ``start_tls`` is ``loop.start_tls`` (stdlib asyncio and uvloop) with the ssl context and
  ``server_hostname`` httpcore passes; the same stream object continues over TLS.
* Connect (once per connection) uses ``asyncio.wait_for`` around ``create_connection``.
* Errors map as in httpcore2's anyio backend: ReadTimeout/ReadError, WriteTimeout/
  WriteError, ConnectTimeout/ConnectError; a clean EOF reads as ``b""``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Any

import anthropic
import httpcore2
import httpx2
from httpcore2 import (
    ConnectError,
    ConnectTimeout,
    ReadError,
    ReadTimeout,
    WriteError,
    WriteTimeout,
)
from httpcore2._backends.base import AsyncNetworkBackend, AsyncNetworkStream

__all__ = ["AsyncioBackend", "AsyncioStream", "install_backend", "make_http_client"]

HIGH_WATER = 256 * 1024  # pause reading above this many buffered bytes
LOW_WATER = 64 * 1024  # resume once reads bring it down to this
DEFAULT_SWEEP_INTERVAL = 0.5  # timeout granularity, seconds
SSL_SHUTDOWN_TIMEOUT = 5.0  # bound on waiting for the peer's close_notify after aclose()
HAPPY_EYEBALLS_DELAY = 0.25  # as anyio.connect_tcp (stdlib loop only; uvloop has no such option)

SocketOption = Any  # httpcore2._types.SOCKET_OPTION


class _Sweeper:
    """Fails overdue reads/writes of one event loop, once per ``interval`` seconds.

    Streams are added when they start a timed wait (``set.add`` of a stream already in the
    set is a no-op) and dropped lazily by the sweep once they no longer wait, so a steady
    stream of waits costs one set look-up each. The timer only runs while the set is not
    empty.
    """

    __slots__ = ("loop", "interval", "waiting", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.waiting: set[AsyncioStream] = set()
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, stream: AsyncioStream) -> None:
        self.waiting.add(stream)
        if self._handle is None:
            self._handle = self.loop.call_later(self.interval, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        now = self.loop.time()
        done = [s for s in self.waiting if not s._expire(now)]
        for s in done:
            self.waiting.discard(s)
        if self.waiting:
            self._handle = self.loop.call_later(self.interval, self._sweep)


class AsyncioStream(asyncio.Protocol, AsyncNetworkStream):
    """One connection: the asyncio protocol and httpcore2's network stream in one object."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sweeper: _Sweeper) -> None:
        self._loop = loop
        self._sweeper = sweeper
        self._transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False  # peer sent FIN or the connection is gone
        self._lost = False  # connection_lost was called
        self._lost_exc: BaseException | None = None
        self._closed = False  # aclose() was called
        self._reading_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._read_deadline: float | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_deadline: float | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        waiter = self._read_waiter
        if waiter is not None:
            self._read_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self._buffered > HIGH_WATER and not self._reading_paused and self._transport is not None:
            try:
                self._transport.pause_reading()
                self._reading_paused = True
            except (RuntimeError, AttributeError):  # closing transport
                pass

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake_reader()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = True
        self._lost_exc = exc
        self._wake_reader()
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)  # write()'s drain re-checks _lost

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None:
            self._read_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the sweeper's hook ----------------------------------------------------------------
    def _expire(self, now: float) -> bool:
        """Fail overdue waits; True while a timed wait is still pending."""
        pending = False
        waiter = self._read_waiter
        if waiter is not None and self._read_deadline is not None and not waiter.done():
            if now >= self._read_deadline:
                self._read_waiter = None
                waiter.set_exception(ReadTimeout("timed out waiting for data from the upstream"))
            else:
                pending = True
        waiter = self._drain_waiter
        if waiter is not None and self._write_deadline is not None and not waiter.done():
            if now >= self._write_deadline:
                self._drain_waiter = None
                waiter.set_exception(WriteTimeout("timed out writing to the upstream"))
            else:
                pending = True
        return pending

    # -- httpcore2.AsyncNetworkStream ------------------------------------------------------
    def _take(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        data = chunks.popleft()
        n = len(data)
        if n > max_bytes:
            chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        elif chunks and n + len(chunks[0]) <= max_bytes:
            parts = [data]
            while chunks and n + len(chunks[0]) <= max_bytes:
                part = chunks.popleft()
                parts.append(part)
                n += len(part)
            data = b"".join(parts)
        self._buffered -= len(data)
        if self._reading_paused and self._buffered <= LOW_WATER:
            self._reading_paused = False
            if self._transport is not None and not self._lost:
                try:
                    self._transport.resume_reading()
                except (RuntimeError, AttributeError):
                    pass
        return data

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        while True:
            if self._closed:
                raise ReadError("the connection was closed")
            if self._buffered:
                return self._take(max_bytes)
            if self._eof:
                if self._lost_exc is not None:
                    raise ReadError(str(self._lost_exc) or repr(self._lost_exc)) from self._lost_exc
                return b""
            if self._read_waiter is not None:
                raise ReadError("another read is already waiting on this connection")
            waiter = self._loop.create_future()
            self._read_waiter = waiter
            if timeout is not None:
                if timeout <= 0:
                    self._read_waiter = None
                    raise ReadTimeout("timed out waiting for data from the upstream")
                self._read_deadline = self._loop.time() + timeout
                self._sweeper.watch(self)
            try:
                await waiter
            finally:
                if self._read_waiter is waiter:
                    self._read_waiter = None
                self._read_deadline = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        transport = self._transport
        if self._closed or self._lost or transport is None or transport.is_closing():
            raise WriteError("the connection is closed")
        try:
            transport.write(buffer)
        except (OSError, RuntimeError) as exc:
            raise WriteError(str(exc) or repr(exc)) from exc
        while self._write_paused:
            if self._lost:
                raise WriteError("the connection was lost while writing")
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            if timeout is not None:
                self._write_deadline = self._loop.time() + timeout
                self._sweeper.watch(self)
            try:
                await waiter
            finally:
                if self._drain_waiter is waiter:
                    self._drain_waiter = None
                self._write_deadline = None
        if self._lost and self._lost_exc is not None:
            raise WriteError(str(self._lost_exc) or repr(self._lost_exc)) from self._lost_exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()
        self._chunks.clear()
        self._buffered = 0
        self._wake_reader()  # a concurrent read (HTTP/2) raises ReadError, as with anyio

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncNetworkStream:
        transport = self._transport
        if transport is None or self._closed or self._lost:
            raise ConnectError("the connection is closed")
        try:
            coro = self._loop.start_tls(
                transport, self, ssl_context, server_hostname=server_hostname,
                ssl_shutdown_timeout=SSL_SHUTDOWN_TIMEOUT,
            )
            tls_transport = await asyncio.wait_for(coro, timeout)
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout("timed out in the TLS handshake") from exc
            if isinstance(exc, (OSError, EOFError, RuntimeError)):  # ssl.SSLError is an OSError
                raise ConnectError(str(exc) or repr(exc)) from exc
            raise
        if tls_transport is None:  # the connection was lost during the handshake
            await self.aclose()
            raise ConnectError("the connection was closed during the TLS handshake")
        self._transport = tls_transport  # type: ignore[assignment]
        self._write_paused = False
        return self

    def get_extra_info(self, info: str) -> Any:
        transport = self._transport
        if info == "is_readable":
            # What httpcore asks of an idle keep-alive connection: "would a read return now?"
            # (normally only a server's close). The event loop drains the socket into our
            # buffer, so answer from the protocol's state rather than polling the socket.
            return bool(self._buffered) or self._eof or self._closed or transport is None or transport.is_closing()
        if transport is None:
            return None
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        return None


class AsyncioBackend(AsyncNetworkBackend):
    """httpcore2 network backend on plain asyncio (or uvloop) protocols and transports."""

    def __init__(self, *, sweep_interval: float = DEFAULT_SWEEP_INTERVAL) -> None:
        self.sweep_interval = sweep_interval
        self.connections_opened = 0  # for tests and debugging
        self._sweeper: _Sweeper | None = None

    def _stream(self) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        sweeper = self._sweeper
        if sweeper is None or sweeper.loop is not loop:
            sweeper = self._sweeper = _Sweeper(loop, self.sweep_interval)
        return AsyncioStream(loop, sweeper)

    @staticmethod
    def _apply_options(stream: AsyncioStream, socket_options: Iterable[SocketOption] | None) -> None:
        if not socket_options:
            return
        sock = stream.get_extra_info("socket")
        if sock is None:
            return
        for option in socket_options:
            sock.setsockopt(*option)

    async def _connect(self, stream: AsyncioStream, coro: Any, timeout: float | None,
                       socket_options: Iterable[SocketOption] | None) -> AsyncioStream:
        try:
            await asyncio.wait_for(coro, timeout)
            self._apply_options(stream, socket_options)
        except TimeoutError as exc:
            await stream.aclose()
            raise ConnectTimeout("timed out connecting to the upstream") from exc
        except OSError as exc:  # includes socket.gaierror
            await stream.aclose()
            raise ConnectError(str(exc) or repr(exc)) from exc
        self.connections_opened += 1
        return stream

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> AsyncNetworkStream:
        stream = self._stream()
        loop = stream._loop
        kwargs: dict[str, Any] = {}
        if local_address:
            kwargs["local_addr"] = (local_address, 0)
        if isinstance(loop, asyncio.BaseEventLoop):  # uvloop's create_connection has no such option
            kwargs["happy_eyeballs_delay"] = HAPPY_EYEBALLS_DELAY
        coro = loop.create_connection(lambda: stream, host, port, **kwargs)
        return await self._connect(stream, coro, timeout, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> AsyncNetworkStream:
        stream = self._stream()
        coro = stream._loop.create_unix_connection(lambda: stream, path)
        return await self._connect(stream, coro, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def install_backend(client: httpx2.AsyncClient, backend: AsyncNetworkBackend) -> int:
    """Make every httpcore2 pool of ``client`` (its transport and proxy mounts) use ``backend``.

    httpx2's ``AsyncHTTPTransport`` has no ``network_backend`` argument, so this sets the
    pool's backend before any connection exists (connections take it from the pool when
    they are created). Returns how many pools were changed.
    """
    transports = [client._transport, *(t for t in client._mounts.values() if t is not None)]
    changed = 0
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if isinstance(pool, httpcore2.AsyncConnectionPool):
            if not hasattr(pool, "_network_backend"):  # pragma: no cover - httpcore2 changed
                raise RuntimeError("httpcore2.AsyncConnectionPool has no _network_backend to replace")
            pool._network_backend = backend
            changed += 1
    return changed


def make_http_client(*, timeout: float | httpx2.Timeout, max_connections: int = 1000,
                     max_keepalive: int = 1000, **kwargs: Any) -> httpx2.AsyncClient:
    """httpx2 client for the SDK using the asyncio backend (what anthropic.DefaultAsyncHttpxClient would build, plus our backend).

    ``anthropic.DefaultAsyncHttpxClient`` supplies the SDK's defaults (follow_redirects,
    TCP keep-alive socket options, proxies from the environment); extra ``kwargs`` (e.g.
    ``event_hooks``, ``verify``, ``http2``) go to it unchanged. A number ``timeout`` keeps
    the SDK's 5 s connect timeout, as ``anthropic.DEFAULT_TIMEOUT`` does.
    """
    if not isinstance(timeout, httpx2.Timeout):
        timeout = httpx2.Timeout(timeout, connect=min(float(timeout), anthropic.DEFAULT_TIMEOUT.connect or 5.0))
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive,
                           keepalive_expiry=anthropic.DEFAULT_CONNECTION_LIMITS.keepalive_expiry)
    client = anthropic.DefaultAsyncHttpxClient(timeout=timeout, limits=limits, **kwargs)
    if install_backend(client, AsyncioBackend()) == 0:  # pragma: no cover - httpx2 changed
        raise RuntimeError("could not find the httpcore2 connection pool of the httpx2 client")
    return client

