"""A tiny HTTP/1.1 server on plain asyncio streams.

Not uvicorn: the fake runs inside another uvicorn process's event loop (offline mode)
without touching its signal handlers or logging, and its handler needs precise control of
the socket (chunked streaming, abrupt drops, noticing a client that hangs up mid-stream).
Scope: Content-Length or chunked request bodies, keep-alive, fixed-length and chunked
responses; no TLS, no HTTP/2, no pipelining beyond keeping early bytes for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Awaitable, Callable, Iterable

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
READ_SIZE = 64 * 1024
# Sleeps at least this long race against the disconnect watcher so that a
# client hang-up during a long ttft/pace wait is noticed at once; shorter
# sleeps use a bare asyncio.sleep (cheaper) and the flag is checked after.
_LONG_SLEEP = 0.05

REASONS: dict[int, str] = {s.value: s.phrase for s in HTTPStatus} | {529: "Overloaded"}

_CHUNK_END = b"0\r\n\r\n"


class BadRequest(Exception):
    """The bytes on the wire are not an HTTP/1.1 request we understand."""


@dataclass
class HttpRequest:
    """One parsed request. Header names are lower-cased; a repeated header keeps its last value."""

    method: str
    path: str  # without the query
    version: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def chunk(data: bytes) -> bytes:
    """Frame ``data`` as one HTTP/1.1 chunk (callers pre-frame to keep one write per event)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


@dataclass(eq=False)  # identity hash: connections live in a set
class HttpConnection:
    """The server side of one TCP connection, handed to the request handler.

    The handler answers each request with exactly one of :meth:`send` or
    :meth:`start_chunked` + :meth:`write` * n + :meth:`end_chunked`, or
    :meth:`abort`. While a response is being produced a watcher task reads the
    socket, so a client that closes the connection sets :attr:`gone` promptly
    (the SDK never pipelines, so any bytes it reads are just kept for later).
    """

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buf: bytearray = field(default_factory=bytearray)
    gone: bool = False
    eof: bool = False
    keep_alive: bool = True
    _watcher: asyncio.Task[None] | None = None

    # -- reading -----------------------------------------------------------
    async def _fill(self) -> bool:
        """Read more bytes into ``buf``; False on EOF/reset."""
        if self.eof:
            return False
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def read_request(self) -> HttpRequest | None:
        """Parse the next request; None when the client closed the connection cleanly between requests."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > MAX_HEADER_BYTES:
                raise BadRequest("headers too large")
            if not await self._fill():
                if self.buf.strip():
                    raise BadRequest("connection closed mid-request")
                return None
        # (stray CRLFs before a request line are tolerated: RFC 9112 section 2.2)
        lines = bytes(self.buf[:end]).decode("latin-1").lstrip("\r\n").split("\r\n")
        del self.buf[: end + 4]
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(f"bad request line {lines[0]!r}")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest(f"bad header line {line!r}")
            headers[name.lower()] = value.strip()
        req = HttpRequest(method.upper(), target.partition("?")[0], version, headers)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            req.body = await self._read_chunked_body()
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise BadRequest("bad content-length") from None
            if length < 0 or length > MAX_BODY_BYTES:
                raise BadRequest("bad content-length")
            req.body = await self._read_exact(length)
        return req

    async def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise BadRequest("connection closed mid-body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def _read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if len(self.buf) > MAX_HEADER_BYTES or not await self._fill():
                raise BadRequest("bad chunked body")

    async def _read_chunked_body(self) -> bytes:
        out = bytearray()
        while True:
            size_line = await self._read_line()
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            if size == 0:
                while await self._read_line():  # trailers, up to the empty line
                    pass
                return bytes(out)
            out += await self._read_exact(size)
            if len(out) > MAX_BODY_BYTES:
                raise BadRequest("body too large")
            await self._read_exact(2)

    # -- disconnect watching -------------------------------------------------
    def watch(self) -> None:
        """Start noticing a client hang-up while a response is being produced."""
        if self._watcher is None and not self.gone:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while await self._fill():
            pass
        self.gone = True

    async def unwatch(self) -> None:
        w, self._watcher = self._watcher, None
        if w is not None and not w.done():
            w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early if the client goes away during a long wait."""
        if seconds <= 0:
            return
        w = self._watcher
        if seconds < _LONG_SLEEP or w is None:
            await asyncio.sleep(seconds)
        elif not w.done():
            await asyncio.wait((w,), timeout=seconds)

    # -- writing -------------------------------------------------------------
    def _closing(self) -> bool:
        if self.gone or self.writer.transport.is_closing():
            self.gone = True
        return self.gone

    async def write(self, data: bytes) -> bool:
        """Write bytes (a response head, or body already framed with :func:`chunk`); False if the client is gone."""
        if self._closing():
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError, RuntimeError):
            self.gone = True
            return False
        return not self._closing()

    def _head(self, status: int, headers: Iterable[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", *(f"{k}: {v}" for k, v in headers)]
        if not self.keep_alive:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(
        self, status: int, headers: list[tuple[str, str]], body: bytes, content_type: str = "application/json"
    ) -> bool:
        """Send a complete fixed-length response; False if the client is gone."""
        hdrs = [("content-type", content_type), ("content-length", str(len(body))), *headers]
        return await self.write(self._head(status, hdrs) + body)

    async def start_chunked(self, status: int, headers: list[tuple[str, str]], content_type: str) -> bool:
        hdrs = [("content-type", content_type), ("transfer-encoding", "chunked"), *headers]
        return await self.write(self._head(status, hdrs))

    async def end_chunked(self, last_framed: bytes = b"") -> bool:
        return await self.write(last_framed + _CHUNK_END)

    def abort(self) -> None:
        """Drop the TCP connection now: no terminating chunk, no more requests."""
        self.keep_alive = False
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


Handler = Callable[[HttpRequest, HttpConnection], Awaitable[None]]


class HttpServer:
    """Accepts connections and feeds each parsed request to ``handler``, in order, per connection."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._conns: set[HttpConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._stopping = False
        self._server = await asyncio.start_server(self._serve, host, port, limit=READ_SIZE * 2, backlog=1024)
        return host, int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, drop open connections and wait for their handlers to finish.

        Aborted sockets end every handler within a write or a sleep; cancelling them first
        would make asyncio's start_server log spurious errors, so it is only the fallback.
        """
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = HttpConnection(reader, writer)
        self._conns.add(conn)
        try:
            while conn.keep_alive and not conn.gone:
                try:
                    req = await conn.read_request()
                except BadRequest as exc:
                    conn.keep_alive = False
                    body = {"type": "error", "error": {"type": "invalid_request_error", "message": str(exc)}}
                    await conn.send(400, [], json.dumps(body).encode())
                    break
                if req is None:
                    break
                conn.keep_alive = req.keep_alive
                conn.watch()
                try:
                    await self._handler(req, conn)
                finally:
                    await conn.unwatch()
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            self._conns.discard(conn)
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()
