"""The fake's HTTP/1.1 on plain asyncio streams: one :class:`HttpConnection` per TCP connection.

Not uvicorn: the fake runs inside another uvicorn process's event loop (offline mode)
without touching its signal handlers or logging, and its handler needs precise control of
the socket (chunked streaming, abrupt drops, noticing a client that hangs up mid-stream).
httptools parses requests (Content-Length or chunked bodies, keep-alive, pipelining);
responses are fixed-length or chunked; no TLS, no HTTP/2.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Iterable

import httptools

MAX_REQUEST_BYTES = 64 * 1024 * 1024
READ_SIZE = 64 * 1024
# Sleeps at least this long race against the disconnect watcher so that a
# client hang-up during a long ttft/pace wait is noticed at once; shorter
# sleeps use a bare asyncio.sleep (cheaper) and the flag is checked after.
_LONG_SLEEP = 0.05

REASONS: dict[int, str] = {s.value: s.phrase for s in HTTPStatus} | {529: "Overloaded"}


@dataclass
class HttpRequest:
    """One parsed request. Header names are lower-cased; a repeated header keeps its last value."""

    method: str
    path: str  # without the query
    headers: dict[str, str]
    body: bytes
    keep_alive: bool = True


def chunk(data: bytes) -> bytes:
    """Frame ``data`` as one HTTP/1.1 chunk (callers pre-frame to keep one write per event)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


@dataclass(eq=False)  # identity hash: connections are dict keys
class HttpConnection:
    """The server side of one TCP connection, handed to the request handler.

    The handler answers each request with :meth:`send`, or with :meth:`head` (chunked) and
    pre-framed chunks through :meth:`write`, or :meth:`abort`. A task reads the socket all along,
    so a client that closes the connection mid-response sets :attr:`gone` promptly.
    """

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    gone: bool = False
    keep_alive: bool = True
    error: str | None = None  # why the bytes received are not a request we understand
    _ready: deque[HttpRequest] = field(default_factory=deque)  # parsed, not yet handled
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a request, an error or EOF
    _req: HttpRequest | None = None  # the one being parsed
    _size = 0  # bytes fed since the last complete request

    def __post_init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        """Parse requests as their bytes arrive; EOF (or a reset) means the client is gone."""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await self.reader.read(READ_SIZE):
                self._size += len(data)
                if self.error is None:  # after an error the rest is only read, to notice the hang-up
                    try:
                        self._parser.feed_data(data)
                    except httptools.HttpParserError as exc:
                        self.error = str(exc) or "bad request"
                    if self._size > MAX_REQUEST_BYTES:
                        self.error = "request too large"
                self._arrived.set()
        if self._req is not None and self.error is None:
            self.error = "connection closed mid-request"
        self.gone = self.error is None  # else the 400 is still sent, for a client that only shut its side
        self._arrived.set()

    async def read_request(self) -> HttpRequest | None:
        """The next request (its :attr:`keep_alive` set); None after the last one (EOF, or see :attr:`error`)."""
        while not self._ready and self.error is None and not self.gone:
            self._arrived.clear()
            await self._arrived.wait()
        if not self._ready:
            return None
        req = self._ready.popleft()
        self.keep_alive = req.keep_alive
        return req

    # httptools callbacks, building requests as bytes are fed (stray CRLFs between requests are skipped)
    def on_message_begin(self) -> None:
        self._req = HttpRequest("", "", {}, bytearray())

    def on_url(self, url: bytes) -> None:
        self._req.path += url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._req.headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()

    def on_body(self, body: bytes) -> None:
        self._req.body += body

    def on_message_complete(self) -> None:
        req, p = self._req, self._parser
        req.method, req.path, req.body = p.get_method().decode(), req.path.partition("?")[0], bytes(req.body)
        req.keep_alive = p.should_keep_alive()
        self._ready.append(req)
        self._req, self._size = None, 0

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early if the client goes away during a long wait."""
        if seconds <= 0:
            return
        if seconds < _LONG_SLEEP:
            await asyncio.sleep(seconds)
        elif not self._reading.done():
            await asyncio.wait((self._reading,), timeout=seconds)

    def _closing(self) -> bool:
        self.gone = self.gone or self.writer.transport.is_closing()
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

    def head(self, status: int, headers: Iterable[tuple[str, str]], content_type: str = "application/json",
             length: int | None = None) -> bytes:
        """A response head: a fixed-length body of ``length`` bytes, or chunked if it is None."""
        framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", f"content-type: {content_type}", framing,
                 *(f"{k}: {v}" for k, v in headers)]
        if not self.keep_alive:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> bool:
        """Send a complete JSON response; False if the client is gone."""
        return await self.write(self.head(status, headers, length=len(body)) + body)

    def abort(self) -> None:
        """Drop the TCP connection now: no terminating chunk, no more requests."""
        self.keep_alive = False
        with contextlib.suppress(Exception):
            self.writer.transport.abort()
