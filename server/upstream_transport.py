"""The SDK's HTTP/1.1 transport to the Messages API: asyncio protocols plus httptools.

Why: httpx2's default transport runs every SSE event through httpcore2's pool bookkeeping,
h11's pure-Python parser and nested async generators. Here httptools parses in ``data_received``
and a body is a list of chunks the reader drains with no timer or checkpoint per chunk.
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
import urllib.request
from collections import deque
from contextlib import suppress
from typing import Any, AsyncIterator, Awaitable

import aiohappyeyeballs
import anthropic
import httptools
import httpx2

HIGH_WATER = 256 * 1024  # pause reading above this many buffered body bytes
LINGER_TICK = 0.01  # coalescing windows end on this grid, seconds (see window_end)
SSL_SHUTDOWN_TIMEOUT = 5.0  # bound on waiting for the peer's close_notify
HAPPY_EYEBALLS_DELAY = 0.25  # before trying the next address (RFC 8305's recommendation)
DEFAULT_PORTS = {b"http": 80, b"https": 443}
MAX_CONNECTIONS = 1000  # in flight, and kept alive when idle
# TCP keep-alive as the SDK's default client sets it: a dead peer is noticed in minutes
SOCKET_OPTIONS = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)] + [
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPINTVL", 60), ("TCP_KEEPCNT", 5), ("TCP_KEEPIDLE", 60)) if hasattr(socket, name)]


def window_end(now: float, seconds: float) -> float:
    """When a window of `seconds` opened at `now` ends: the first tick at least that far on a grid every stream
    shares (one wake-up serves all windows ending there); ticks are `LINGER_TICK`, or an eighth of a window."""
    tick = min(LINGER_TICK, seconds / 8) or LINGER_TICK
    return math.ceil((now + seconds) / tick - 1e-6) * tick  # (- 1e-6: not a tick late on a rounding error)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: asyncio protocol, httptools callbacks, the answer being read."""

    __slots__ = ("_loop", "_timer", "origin", "transport", "lost", "lost_exc", "idle_since", "_parser",
                 "_head_method_request", "status", "reason", "headers", "head_done", "complete", "received_any",
                 "error", "chunks", "buffered", "_paused", "_waiter", "_deadline", "_timeout_exc", "_write_paused",
                 "_until_close", "_wake_marker", "_steady", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: tuple[bytes, bytes, int]) -> None:
        self._loop, self.origin = loop, origin
        self.transport = self.lost_exc = self.error = None  # (error: a parse error; it closes the connection)
        self.lost = self._paused = self._write_paused = False
        self.chunks: list[bytes] = []  # (a list: a deque costs more memory per connection)
        self._waiter = self._deadline = self._timer = self._wake_marker = None  # (see _wait, _arm_deadline, linger)
        self._new_answer(b"")

    def _new_answer(self, head: bytes) -> None:
        """Ready for the answer to the request `head` (b"": none asked for yet)."""
        self._parser = httptools.HttpResponseParser(self) if head else None
        self._head_method_request = head.startswith(b"HEAD ")  # (its answer has no body)
        self.status, self.reason, self.headers = 0, b"", []
        self.head_done = self.complete = self.received_any = self._until_close = self._steady = False
        self.chunks.clear()
        self.buffered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        parser = self._parser
        if parser is None:  # bytes nobody asked for: the connection cannot be reused
            self._fail(httpx2.RemoteProtocolError("unexpected data from the upstream on an idle connection"))
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - we never ask to upgrade
            self._fail(httpx2.RemoteProtocolError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(httpx2.RemoteProtocolError(f"malformed answer from the upstream: {exc}"))
        if self.buffered > HIGH_WATER and not self._paused:
            self._paused = self._pause_reading()

    def eof_received(self) -> None:
        self.connection_lost(None)  # (at once: returning None, the transport closes itself next)

    def connection_lost(self, exc: Exception | None) -> None:
        # (httptools has no "end of input" call: a body delimited by a clean close ends here)
        if exc is None and self.head_done and not self.complete and self._until_close and self.error is None:
            self.complete = True
        self.lost, self.lost_exc = True, exc
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (103 Early Hints, 100 Continue): the real one follows
            self.reason, self.headers = b"", []
            return
        self.status, self.head_done = status, True
        self._until_close = not any(name.lower() in (b"content-length", b"transfer-encoding")
                                    for name, _ in self.headers) and status not in (204, 304)  # (ends at the close)
        if self._head_method_request:  # no body follows, whatever Content-Length says
            self.complete = True
            self._parser = None
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self._waiter is not None and (self._wake_marker is None or self._wake_marker in body):
            self._wake()

    def on_message_complete(self) -> None:
        if self.head_done:  # (not the end of an interim answer)
            self.complete = True
            if not self._parser.should_keep_alive():  # (asked now: llhttp forgets it on return)
                self._parser = None  # (not kept alive)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self.close()

    def _expire(self) -> None:
        """The timer: fail an overdue wait, or wait on for a deadline that has moved since."""
        self._timer = None
        waiter, deadline = self._waiter, self._deadline
        if waiter is None or deadline is None or waiter.done():
            return
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._expire)
            return
        self._waiter = None
        waiter.set_exception(self._timeout_exc("timed out waiting for the upstream"))

    async def _wait(self, timeout: float | None, exc: type[Exception]) -> None:
        if timeout is not None and timeout <= 0:
            raise exc("timed out waiting for the upstream")
        waiter = self._waiter = self._loop.create_future()  # (left behind if cancelled: it is done, then)
        self._deadline = None
        if timeout is not None:
            self._arm_deadline(timeout, exc)
        await waiter

    def _arm_deadline(self, timeout: float, exc: type[Exception]) -> None:
        # no timer per wait: one per connection, set when none would fire by this deadline (see _expire)
        self._deadline = deadline = self._loop.time() + timeout
        self._timeout_exc = exc
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._expire)

    def _raise_if_broken(self) -> None:
        if self.error is not None:
            raise self.error
        if self.lost:
            if self.lost_exc is not None:
                raise httpx2.ReadError(str(self.lost_exc) or repr(self.lost_exc)) from self.lost_exc
            raise httpx2.RemoteProtocolError("the upstream closed the connection without a complete answer")

    def reusable(self, now: float, expiry: float | None) -> bool:  # (of a connected one, in the pool)
        return not (self.lost or self.transport.is_closing()) and (expiry is None or now - self.idle_since < expiry)

    async def send(self, head: bytes, body: bytes, timeout: float | None) -> None:
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            raise httpx2.WriteError("the connection is closed")
        self._new_answer(head)
        try:
            transport.writelines((head, body))  # (a long body is not copied to join them)
        except (OSError, RuntimeError) as exc:
            raise httpx2.WriteError(str(exc) or repr(exc)) from exc
        while self._write_paused and not self.lost:
            await self._wait(timeout, httpx2.WriteTimeout)
        if self.lost and not self.head_done and self.lost_exc is not None:
            raise httpx2.WriteError(str(self.lost_exc) or repr(self.lost_exc)) from self.lost_exc

    async def receive_head(self, timeout: float | None) -> None:
        while not self.head_done:
            self._raise_if_broken()
            await self._wait(timeout, httpx2.ReadTimeout)

    async def linger(self, seconds: float, marker: bytes, timeout: float | None) -> None:
        """Let the body gather until `window_end(now, seconds)`, then return with the next piece;
        `marker` or the end come sooner. From an answer's second window on the socket is not read."""
        if self.complete or self.lost or any(marker in c for c in self.chunks):
            return
        self._wake_marker = marker  # (only this wakes the reader before the window ends)
        timer = self._loop.call_at(window_end(self._loop.time(), seconds), self._linger_over, timeout)
        if self._steady and not self._paused:
            self._paused = self._pause_reading()
        try:
            await self._wait(None, httpx2.ReadTimeout)  # (`_linger_over` may give it a deadline)
        finally:
            timer.cancel()
            self._wake_marker = None
            if self._paused:
                self._resume_reading()
        self._steady = True  # (this answer's later windows pause reading)

    def _linger_over(self, timeout: float | None) -> None:
        """The window is over: return what is here, else wait for the next piece as a read would."""
        if self._paused:
            self._resume_reading()
        if self.chunks or self.complete or self.lost:
            self._wake()
            return
        self._wake_marker = None  # any piece ends the wait now
        if timeout is not None:
            self._arm_deadline(timeout, httpx2.ReadTimeout)

    def _pause_reading(self) -> bool:
        """Stop reading the socket; False if it could not (no transport, or a closing one)."""
        try:
            self.transport.pause_reading()  # type: ignore[union-attr]
        except (RuntimeError, AttributeError):
            return False
        return True

    def _resume_reading(self) -> None:
        self._paused = False
        if self.transport is not None and not self.lost:
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused:
            self._resume_reading()
        return data

    def keep_alive(self) -> bool:
        return self.complete and self._parser is not None and not self.chunks and not self.lost

    def close(self) -> None:
        self._parser = None
        self.lost = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        if self._timer is not None:  # (a pending timer would keep the connection until it fires)
            self._timer.cancel()
        self._wake()


class ResponseBody(httpx2.AsyncByteStream):
    """The body of one response; closing it returns the connection to `pool`, its transport."""

    __slots__ = ("pool", "_conn", "_timeout")

    def __init__(self, pool: UpstreamTransport, conn: Connection, read_timeout: float | None) -> None:
        self.pool, self._conn, self._timeout = pool, conn, read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    async def read(self) -> bytes:
        """The next piece of the body (all that is buffered), ``b""`` at its end."""
        conn = self._conn
        if conn is None:
            raise httpx2.StreamClosed()
        while True:
            if conn.chunks:
                return conn.take()
            if conn.complete:
                return b""
            conn._raise_if_broken()
            await conn._wait(self._timeout, httpx2.ReadTimeout)

    def linger(self, seconds: float, marker: bytes) -> Awaitable[None]:
        """:meth:`Connection.linger` (never called once the body is closed)."""
        return self._conn.linger(seconds, marker, self._timeout)  # type: ignore[union-attr]

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self.pool._release(conn)


class UpstreamTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport: HTTP/1.1 with a pool of idle connections per origin, newest first."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, max_connections: int = MAX_CONNECTIONS,
                 max_keepalive: int = MAX_CONNECTIONS, keepalive_expiry: float | None = 5.0) -> None:
        self._ssl_context, self._max_keepalive, self._keepalive_expiry = ssl_context, max_keepalive, keepalive_expiry
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[bytes, bytes, int], deque[Connection]] = {}
        self._idle_count = 0
        self._closed = False
        self.connections_opened = 0  # for tests and debugging

    def _take_idle(self, origin: tuple[bytes, bytes, int], now: float) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if conn.reusable(now, self._keepalive_expiry):
                return conn
            conn.close()
        return None

    def _release(self, conn: Connection) -> None:
        self._slots.release()
        if self._closed or not conn.keep_alive() or self._idle_count >= self._max_keepalive:
            conn.close()
            return
        conn._parser = None
        conn.idle_since = now = conn._loop.time()
        idle = self._idle.setdefault(conn.origin, deque())
        if idle and not idle[0].reusable(now, self._keepalive_expiry):  # prune the oldest (it makes room)
            idle.popleft().close()
        else:
            self._idle_count += 1
        idle.append(conn)

    async def _connect(self, origin: tuple[bytes, bytes, int], timeout: float | None) -> Connection:
        loop = asyncio.get_running_loop()
        conn = Connection(loop, origin)
        scheme, host, port = origin
        hostname = host.decode("ascii").strip("[]")
        try:
            async with asyncio.timeout(timeout):
                addresses = await loop.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
                sock = await aiohappyeyeballs.start_connection(addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY)
                for option in SOCKET_OPTIONS:
                    with suppress(OSError):  # (an option this platform lacks)
                        sock.setsockopt(*option)
                tls = {"ssl": self._ssl_context or httpx2.create_ssl_context(), "server_hostname": hostname,
                       "ssl_shutdown_timeout": SSL_SHUTDOWN_TIMEOUT} if scheme == b"https" else {}
                await loop.create_connection(lambda: conn, sock=sock, **tls)
        except TimeoutError as exc:
            conn.close()
            raise httpx2.ConnectTimeout("timed out connecting to the upstream") from exc
        except (OSError, EOFError, RuntimeError) as exc:  # incl. socket.gaierror and ssl.SSLError
            conn.close()
            raise httpx2.ConnectError(str(exc) or repr(exc)) from exc
        self.connections_opened += 1
        return conn

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._closed:
            raise RuntimeError("the upstream transport is closed")
        url, scheme = request.url, request.url.raw_scheme
        if scheme not in DEFAULT_PORTS:
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        origin = (scheme, url.raw_host, url.port or DEFAULT_PORTS[scheme])
        timeouts = request.extensions.get("timeout") or {}
        head, body = await _encode_request(request)
        try:  # (a timeout only when waiting: no timer per request)
            async with asyncio.timeout(timeouts.get("pool") if self._slots.locked() else None):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise httpx2.PoolTimeout("no free upstream connection in time") from exc
        try:
            conn = self._take_idle(origin, asyncio.get_running_loop().time())
            if conn is not None:
                try:
                    await conn.send(head, body, timeouts.get("write"))
                    await conn.receive_head(timeouts.get("read"))
                except (httpx2.WriteError, httpx2.ReadError, httpx2.RemoteProtocolError):
                    if conn.received_any:
                        raise
                    conn.close()  # it went stale while idle: once more on a new connection
                    conn = None
            if conn is None:
                conn = await self._connect(origin, timeouts.get("connect"))
                await conn.send(head, body, timeouts.get("write"))
                await conn.receive_head(timeouts.get("read"))
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise
        body = ResponseBody(self, conn, timeouts.get("read"))
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": conn.reason.strip(),
                      "network_stream": conn.transport, "upstream_body": body}
        headers, conn.headers = conn.headers, []  # (handed over: not held by the connection all stream long)
        return httpx2.Response(conn.status, headers=headers, stream=body, extensions=extensions)

    async def aclose(self) -> None:
        self._closed = True
        for conn in [conn for idle in self._idle.values() for conn in idle]:
            conn.close()
        self._idle.clear()
        self._idle_count = 0


async def _encode_request(request: httpx2.Request) -> tuple[bytes, bytes]:
    """The request line and headers, and the body (chunk-encoded when its length is unknown)."""
    body = await request.aread()  # (the SDK's bodies are bytes, already read)
    headers = request.headers.raw
    if "transfer-encoding" in request.headers:
        body = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
    elif body and "content-length" not in request.headers:
        headers = [*headers, (b"Content-Length", str(len(body)).encode())]
    lines = [b"%b %b HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    lines += [b"%b: %b" % (name, value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n", body


def direct_body(response: httpx2.Response) -> ResponseBody | None:
    """The body of an unencoded response from :class:`UpstreamTransport`, to read directly."""
    body = response.extensions.get("upstream_body")
    encoding = response.headers.get("content-encoding", "identity")
    return body if isinstance(body, ResponseBody) and encoding == "identity" else None


def make_http_client(*, timeout: float | httpx2.Timeout, **kwargs: Any) -> httpx2.AsyncClient:
    """The SDK's http client on :class:`UpstreamTransport`; with a proxy in the environment, as it
    comes (its transports handle proxies and ``NO_PROXY``). A number keeps the SDK's connect timeout."""
    if not isinstance(timeout, httpx2.Timeout):
        timeout = httpx2.Timeout(timeout, connect=min(float(timeout), anthropic.DEFAULT_TIMEOUT.connect or 5.0))
    expiry = anthropic.DEFAULT_CONNECTION_LIMITS.keepalive_expiry
    verify, cert, trust_env = kwargs.pop("verify", True), kwargs.pop("cert", None), kwargs.get("trust_env", True)
    if kwargs.get("http2"):
        raise ValueError("the upstream transport speaks HTTP/1.1 only")
    if trust_env and any(urllib.request.getproxies().get(scheme) for scheme in ("http", "https", "all")):
        limits = httpx2.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS,
                               keepalive_expiry=expiry)  # (proxies as httpx2 reads them)
        return anthropic.DefaultAsyncHttpxClient(timeout=timeout, limits=limits, verify=verify, cert=cert, **kwargs)
    ssl_context = httpx2.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
    transport = UpstreamTransport(ssl_context=ssl_context, keepalive_expiry=expiry)
    return anthropic.DefaultAsyncHttpxClient(transport=transport, timeout=timeout, **kwargs)
