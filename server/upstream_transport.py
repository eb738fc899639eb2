"""The SDK's HTTP/1.1 transport to the Messages API: asyncio protocols plus httptools.

Why: httpx2's default transport runs every SSE event through httpcore2's pool bookkeeping,
h11's pure-Python parser and nested async generators. Here httptools parses in
``data_received`` and a body is a list of chunks the reader drains with no timer or
checkpoint per chunk; the SDK above still does auth, retries and typed errors (httpx2's).

* Pool: idle keep-alive connections per origin, newest first; ``max_connections`` bounds
  requests in flight. A reused connection that fails before any byte of the answer is
  retried once on a new one (the request cannot have been processed).
* Connect: all resolved addresses, IPv6 and IPv4 interleaved (Happy Eyeballs).
* Timeouts: a waiting read stores a deadline; one timer per loop (:class:`_Sweeper`) fails
  overdue ones, up to ``sweep_interval`` late.
* ``linger`` (``STREAM_COALESCE_MS``): tokens gather until a tick of a grid every stream
  shares (:func:`window_end`); from an answer's second window on the socket is not read
  meanwhile, so one read takes a whole window's worth.
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
import urllib.request
from collections import deque
from collections.abc import Iterable
from typing import Any, AsyncIterator

import aiohappyeyeballs
import anthropic
import httptools
import httpx2

__all__ = ["ResponseBody", "UpstreamTransport", "direct_body", "make_http_client", "window_end"]

HIGH_WATER = 256 * 1024  # pause reading above this many buffered body bytes
DEFAULT_SWEEP_INTERVAL = 0.5  # timeout granularity, seconds
LINGER_TICK = 0.01  # coalescing windows end on this grid, seconds (see window_end)
SSL_SHUTDOWN_TIMEOUT = 5.0  # bound on waiting for the peer's close_notify
HAPPY_EYEBALLS_DELAY = 0.25  # before trying the next address (RFC 8305's recommendation)
DEFAULT_PORTS = {b"http": 80, b"https": 443}

SocketOption = tuple[int, int, Any]


def keepalive_socket_options() -> list[SocketOption]:
    """TCP keep-alive as the SDK's default client sets it: a dead peer is noticed in minutes."""
    options: list[SocketOption] = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)]
    for name, value in (("TCP_KEEPINTVL", 60), ("TCP_KEEPCNT", 5), ("TCP_KEEPIDLE", 60)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


def window_end(now: float, seconds: float) -> float:
    """When a coalescing window of `seconds` opened at `now` ends: the first tick at least
    `seconds` away on a grid shared by every stream, so one wake-up of the worker serves all
    windows ending at that tick. The tick is `LINGER_TICK`, or an eighth of a shorter window."""
    tick = min(LINGER_TICK, seconds / 8) or LINGER_TICK
    return math.ceil((now + seconds) / tick - 1e-6) * tick  # (- 1e-6: not a tick late on a rounding error)


class _Sweeper:
    """Fails the overdue waits of one event loop every ``interval`` seconds; it runs only
    while some connection waits (dropped by the sweep once it no longer does)."""

    __slots__ = ("loop", "interval", "waiting", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.waiting: set[Connection] = set()
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, conn: Connection) -> None:
        self.waiting.add(conn)
        if self._handle is None:
            self._handle = self.loop.call_later(self.interval, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        now = self.loop.time()
        done = [c for c in self.waiting if not c._expire(now)]
        for c in done:
            self.waiting.discard(c)
        if self.waiting:
            self._handle = self.loop.call_later(self.interval, self._sweep)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: the asyncio protocol, the httptools parser's callbacks and
    the state of the response being read (one at a time)."""

    __slots__ = ("_loop", "_sweeper", "origin", "transport", "lost", "lost_exc", "idle_since",
                 "_parser", "_head_method_request", "status", "reason", "headers", "head_done", "complete",
                 "reusable_after", "received_any", "error", "chunks", "buffered", "_paused", "_waiter",
                 "_deadline", "_timeout_exc", "_write_paused", "_until_close", "_wake_marker", "_steady",
                 "_linger_paused", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop, sweeper: _Sweeper, origin: tuple[bytes, bytes, int]) -> None:
        self._loop = loop
        self._sweeper = sweeper
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.lost_exc: BaseException | None = None
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._head_method_request = False
        # the response in progress
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.reusable_after = False  # the answer allows keep-alive (known once complete)
        self._until_close = False  # a body with no length and no chunking: it ends with the connection
        self.received_any = False
        self.error: Exception | None = None  # a parse error
        self.chunks: list[bytes] = []  # (a list: a deque costs more memory per connection)
        self.buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: float | None = None
        self._timeout_exc: type[Exception] = httpx2.ReadTimeout
        self._write_paused = False
        self._wake_marker: bytes | None = None  # while lingering: only this wakes the reader early
        self._steady = False  # the answer has been lingered over once: later windows pause reading
        self._linger_paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------
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

    def eof_received(self) -> bool | None:
        self._end_of_input(clean=True)
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_of_input(clean=exc is None)
        self.lost_exc = exc
        self._write_paused = False
        self._wake()

    def _end_of_input(self, clean: bool) -> None:
        # (httptools has no "end of input" call: a body delimited by a clean close ends here)
        if clean and self.head_done and not self.complete and self._until_close and self.error is None:
            self.complete = True
        self.lost = True
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # -- httptools callbacks ---------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (103 Early Hints, 100 Continue): the real one follows
            self.reason, self.headers = b"", []
            return
        self.status = status
        self.head_done = True
        self._until_close = not any(name.lower() in (b"content-length", b"transfer-encoding")
                                    for name, _ in self.headers) and status not in (204, 304)
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
        if not self.head_done:  # the end of an interim answer, not of the response
            return
        self.complete = True
        assert self._parser is not None
        self.reusable_after = self._parser.should_keep_alive()  # (llhttp forgets it on return)
        self._wake()

    # -- waiting ---------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self._parser = None
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _expire(self, now: float) -> bool:
        """Fail an overdue wait; True while a timed wait is still pending."""
        waiter = self._waiter
        if waiter is None or self._deadline is None or waiter.done():
            return False
        if now < self._deadline:
            return True
        self._waiter = None
        waiter.set_exception(self._timeout_exc("timed out waiting for the upstream"))
        return False

    async def _wait(self, timeout: float | None, exc: type[Exception]) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        if timeout is not None:
            if timeout <= 0:
                self._waiter = None
                raise exc("timed out waiting for the upstream")
            self._arm_deadline(timeout, exc)
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
            self._deadline = None

    def _arm_deadline(self, timeout: float, exc: type[Exception]) -> None:
        self._deadline = self._loop.time() + timeout
        self._timeout_exc = exc
        self._sweeper.watch(self)

    def _raise_if_broken(self) -> None:
        if self.error is not None:
            raise self.error
        if self.lost:
            if self.lost_exc is not None:
                raise httpx2.ReadError(str(self.lost_exc) or repr(self.lost_exc)) from self.lost_exc
            raise httpx2.RemoteProtocolError("the upstream closed the connection without a complete answer")

    # -- one exchange ----------------------------------------------------------------------
    def reusable(self, now: float, expiry: float | None) -> bool:
        transport = self.transport
        if self.lost or self.error is not None or transport is None or transport.is_closing():
            return False
        return expiry is None or now - self.idle_since < expiry

    async def send(self, head: bytes, body: bytes, is_head: bool, timeout: float | None) -> None:
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            raise httpx2.WriteError("the connection is closed")
        self.status, self.reason, self.headers = 0, b"", []
        self.head_done = self.complete = self.received_any = self.reusable_after = self._until_close = False
        self.chunks.clear()
        self.buffered = 0
        self._head_method_request = is_head
        self._steady = False
        self._parser = httptools.HttpResponseParser(self)
        try:
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
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
        """Let body data gather until `window_end(now, seconds)`, then return with the first
        piece after that (at once if one is here); a piece holding `marker`, or the end of
        the body, ends it sooner. From the second window of an answer on, the socket is not
        read during the window (the kernel gathers the pieces for one read), so the marker
        is then only seen when the window is over."""
        if self.complete or self.lost or self.error is not None or any(marker in c for c in self.chunks):
            return
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._wake_marker = marker
        timer = self._loop.call_at(window_end(self._loop.time(), seconds), self._linger_over, timeout)
        if self._steady and not self._paused:
            self._linger_paused = self._pause_reading()
        try:
            await waiter
        finally:
            timer.cancel()
            self._wake_marker = None
            self._deadline = None
            if self._waiter is waiter:
                self._waiter = None
            self._end_linger_pause()
        self._steady = True

    def _linger_over(self, timeout: float | None) -> None:
        """The window is over: read again; return what is here, else wait for the next piece
        as a read would (with its timeout)."""
        self._end_linger_pause()
        if self.chunks or self.complete or self.lost or self.error is not None:
            self._wake()
            return
        self._wake_marker = None  # any piece ends the wait now
        if timeout is not None:
            self._arm_deadline(timeout, httpx2.ReadTimeout)

    def _end_linger_pause(self) -> None:
        if self._linger_paused:
            self._linger_paused = False
            self._resume_reading()

    def _pause_reading(self) -> bool:
        """Stop reading the socket; False if it could not (no transport, or a closing one)."""
        try:
            self.transport.pause_reading()  # type: ignore[union-attr]
        except (RuntimeError, AttributeError):
            return False
        return True

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def take(self) -> bytes:
        """Everything buffered so far, as one piece."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused:
            self._paused = False
            self._resume_reading()
        return data

    def keep_alive(self) -> bool:
        return (self.complete and self.reusable_after and self._parser is not None and not self.chunks
                and self.error is None and not self.lost)

    def close(self) -> None:
        self._parser = None
        self.lost = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        self._wake()

    def get_extra_info(self, info: str) -> Any:
        """httpcore-style extras for ``response.extensions["network_stream"]``."""
        if self.transport is None:
            return None
        return self.transport.get_extra_info({"client_addr": "sockname", "server_addr": "peername"}.get(info, info))


class ResponseBody(httpx2.AsyncByteStream):
    """The body of one response; closing it returns a finished keep-alive connection to
    `pool`, the transport it came from."""

    __slots__ = ("pool", "_conn", "_timeout")

    def __init__(self, pool: UpstreamTransport, conn: Connection, read_timeout: float | None) -> None:
        self.pool = pool
        self._conn: Connection | None = conn
        self._timeout = read_timeout

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

    async def linger(self, seconds: float, marker: bytes) -> None:
        """Let more of the body gather for `seconds` (see :meth:`Connection.linger`)."""
        if self._conn is not None:
            await self._conn.linger(seconds, marker, self._timeout)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self.pool._release(conn)


class UpstreamTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport: HTTP/1.1 over asyncio (or uvloop) with a keep-alive pool."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, max_connections: int | None = 1000,
                 max_keepalive: int | None = 1000, keepalive_expiry: float | None = 5.0,
                 socket_options: Iterable[SocketOption] | None = None,
                 sweep_interval: float = DEFAULT_SWEEP_INTERVAL) -> None:
        self._ssl_context = ssl_context
        self._max_keepalive = max_keepalive
        self._keepalive_expiry = keepalive_expiry
        self._socket_options = list(socket_options or ())
        self._sweep_interval = sweep_interval
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None
        self._idle: dict[tuple[bytes, bytes, int], deque[Connection]] = {}
        self._idle_count = 0
        self._sweeper: _Sweeper | None = None
        self._closed = False
        self.connections_opened = 0  # for tests and debugging

    # -- the pool --------------------------------------------------------------------------
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
        if self._slots is not None:
            self._slots.release()
        if self._closed or not conn.keep_alive() or (self._max_keepalive is not None
                                                     and self._idle_count >= self._max_keepalive):
            conn.close()
            return
        conn._parser = None
        conn.idle_since = now = conn._loop.time()
        idle = self._idle.setdefault(conn.origin, deque())
        if idle and not idle[0].reusable(now, self._keepalive_expiry):  # prune the oldest
            idle.popleft().close()
            self._idle_count -= 1
        idle.append(conn)
        self._idle_count += 1

    async def _connect(self, origin: tuple[bytes, bytes, int], timeout: float | None) -> Connection:
        loop = asyncio.get_running_loop()
        sweeper = self._sweeper
        if sweeper is None or sweeper.loop is not loop:
            sweeper = self._sweeper = _Sweeper(loop, self._sweep_interval)
        conn = Connection(loop, sweeper, origin)
        try:
            await asyncio.wait_for(self._open(loop, conn), timeout)
        except TimeoutError as exc:
            conn.close()
            raise httpx2.ConnectTimeout("timed out connecting to the upstream") from exc
        except (OSError, EOFError, RuntimeError) as exc:  # incl. socket.gaierror and ssl.SSLError
            conn.close()
            raise httpx2.ConnectError(str(exc) or repr(exc)) from exc
        self.connections_opened += 1
        return conn

    async def _open(self, loop: asyncio.AbstractEventLoop, conn: Connection) -> None:
        scheme, host, port = conn.origin
        hostname = host.decode("ascii").strip("[]")
        addresses = await loop.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
        sock = await aiohappyeyeballs.start_connection(addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, loop=loop)
        for option in self._socket_options:
            try:
                sock.setsockopt(*option)
            except OSError:  # pragma: no cover - an option this platform lacks
                pass
        tls: dict[str, Any] = {}
        if scheme == b"https":
            tls = {"ssl": self._ssl_context or httpx2.create_ssl_context(), "server_hostname": hostname,
                   "ssl_shutdown_timeout": SSL_SHUTDOWN_TIMEOUT}
        await loop.create_connection(lambda: conn, sock=sock, **tls)

    # -- httpx2.AsyncBaseTransport ---------------------------------------------------------
    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._closed:
            raise RuntimeError("the upstream transport is closed")
        url = request.url
        scheme = url.raw_scheme
        if scheme not in DEFAULT_PORTS:
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        origin = (scheme, url.raw_host, url.port or DEFAULT_PORTS[scheme])
        timeouts = request.extensions.get("timeout") or {}
        head, body = await _encode_request(request)
        is_head = request.method == "HEAD"
        if self._slots is not None:
            try:
                if self._slots.locked():
                    await asyncio.wait_for(self._slots.acquire(), timeouts.get("pool"))
                else:
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise httpx2.PoolTimeout("no free upstream connection in time") from exc
        try:
            conn = self._take_idle(origin, asyncio.get_running_loop().time())
            if conn is not None:
                try:
                    await conn.send(head, body, is_head, timeouts.get("write"))
                    await conn.receive_head(timeouts.get("read"))
                except (httpx2.WriteError, httpx2.ReadError, httpx2.RemoteProtocolError):
                    if conn.received_any:
                        raise
                    conn.close()  # it went stale while idle: once more on a new connection
                    conn = None
            if conn is None:
                conn = await self._connect(origin, timeouts.get("connect"))
                await conn.send(head, body, is_head, timeouts.get("write"))
                await conn.receive_head(timeouts.get("read"))
        except BaseException:
            if conn is not None:
                conn.close()
            if self._slots is not None:
                self._slots.release()
            raise
        body = ResponseBody(self, conn, timeouts.get("read"))
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": conn.reason.strip(), "network_stream": conn,
                      "upstream_body": body}
        headers, conn.headers = conn.headers, []  # (handed over: not held by the connection all stream long)
        return httpx2.Response(conn.status, headers=headers, stream=body, extensions=extensions)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        self._idle_count = 0


async def _encode_request(request: httpx2.Request) -> tuple[bytes, bytes]:
    """The request line and headers, and the body (chunk-encoded when its length is unknown)."""
    try:
        body = request.content  # the SDK's bodies are bytes, already read
    except httpx2.RequestNotRead:
        body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
    names = {name.lower() for name, _ in request.headers.raw}
    headers = request.headers.raw
    if b"transfer-encoding" in names:
        body = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
    elif b"content-length" not in names and body:
        headers = [*headers, (b"Content-Length", str(len(body)).encode())]
    lines = [b"%b %b HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    lines += [b"%b: %b" % (name, value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n", body


def direct_body(response: httpx2.Response) -> ResponseBody | None:
    """The body of a response from :class:`UpstreamTransport` with no content-encoding, whose
    ``read()`` and ``linger()`` a reader can call directly; None otherwise."""
    body = response.extensions.get("upstream_body")
    if not isinstance(body, ResponseBody) or response.headers.get("content-encoding", "identity") != "identity":
        return None
    return body


def make_http_client(*, timeout: float | httpx2.Timeout, max_connections: int = 1000,
                     max_keepalive: int = 1000, **kwargs: Any) -> httpx2.AsyncClient:
    """The SDK's http client (``anthropic.DefaultAsyncHttpxClient``: redirects, ``verify``,
    ``cert``) on :class:`UpstreamTransport`; when the environment names a proxy
    (``HTTPS_PROXY``, ``ALL_PROXY``...), the SDK's client as it comes, whose httpx2 transports
    handle proxies and ``NO_PROXY``. A number ``timeout`` keeps the SDK's connect timeout."""
    if not isinstance(timeout, httpx2.Timeout):
        timeout = httpx2.Timeout(timeout, connect=min(float(timeout), anthropic.DEFAULT_TIMEOUT.connect or 5.0))
    expiry = anthropic.DEFAULT_CONNECTION_LIMITS.keepalive_expiry
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive,
                           keepalive_expiry=expiry)
    verify, cert = kwargs.pop("verify", True), kwargs.pop("cert", None)
    if kwargs.get("http2"):
        raise ValueError("the upstream transport speaks HTTP/1.1 only")
    proxies = urllib.request.getproxies()  # (as httpx2 reads them)
    if kwargs.get("trust_env", True) and any(proxies.get(scheme) for scheme in ("http", "https", "all")):
        return anthropic.DefaultAsyncHttpxClient(timeout=timeout, limits=limits, verify=verify, cert=cert, **kwargs)
    ssl_context = httpx2.create_ssl_context(verify=verify, cert=cert, trust_env=kwargs.get("trust_env", True))
    transport = UpstreamTransport(ssl_context=ssl_context, max_connections=max_connections,
                                  max_keepalive=max_keepalive, keepalive_expiry=expiry,
                                  socket_options=keepalive_socket_options())
    return anthropic.DefaultAsyncHttpxClient(transport=transport, timeout=timeout, **kwargs)
