"""Connecting to the upstream (server/upstream_transport.py): every address a name resolves
to, IPv6 and IPv4 interleaved (Happy Eyeballs), over real loopback sockets. The name
`dual.test` resolves as the test says (the only stand-in: a real resolver cannot be told to);
`localhost` here may resolve to IPv4 only."""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import ExitStack, asynccontextmanager
from typing import AsyncIterator

import httpx2
import pytest

from server.upstream_transport import UpstreamTransport

V4, V6 = "127.0.0.1", "::1"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind((V6, 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    writer.close()


@asynccontextmanager
async def http_server(host: str, port: int = 0) -> AsyncIterator[int]:
    server = await asyncio.start_server(answer, host, port)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def stuck_listener(stack: ExitStack, host: str, port: int) -> int:
    """A listener on `host:port` whose accept queue is full, so connecting there hangs (as to
    an address whose packets are dropped); returns its port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = stack.enter_context(socket.socket(family))
    listener.bind((host, port))
    listener.listen(0)
    port = listener.getsockname()[1]
    for _ in range(8):
        filler = stack.enter_context(socket.socket(family))
        filler.setblocking(False)
        try:
            filler.connect((host, port))
        except BlockingIOError:
            pass
    return port


def resolve_dual(monkeypatch: pytest.MonkeyPatch, first: str, second: str) -> None:
    """`dual.test` resolves to `first`, then `second` (the order a resolver gives them in)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host != "dual.test":
            return real(host, port, *args, **kwargs)
        return [info for address in (first, second) for info in real(address, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


async def get(url: str) -> float:
    """GET `url` through our transport (5 s connect timeout); how long it took."""
    started = time.monotonic()
    async with httpx2.AsyncClient(transport=UpstreamTransport(), timeout=httpx2.Timeout(30, connect=5)) as client:
        assert (await client.get(url)).text == "ok"
    return time.monotonic() - started


async def test_an_ipv4_only_server_by_a_name_resolving_to_ipv6_first(monkeypatch: pytest.MonkeyPatch) -> None:
    resolve_dual(monkeypatch, V6, V4)
    async with http_server(V4) as port:
        assert await get(f"http://dual.test:{port}/") < 1.0  # ::1 refuses: IPv4 at once


@needs_ipv6
async def test_an_ipv6_address_that_hangs_does_not_stall_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    resolve_dual(monkeypatch, V6, V4)
    async with http_server(V4) as port:
        with ExitStack() as stack:
            stuck_listener(stack, V6, port)
            assert await get(f"http://dual.test:{port}/") < 2.0  # not the 5 s connect timeout


@needs_ipv6
async def test_an_ipv6_only_server(monkeypatch: pytest.MonkeyPatch) -> None:
    resolve_dual(monkeypatch, V4, V6)
    async with http_server(V6) as port:
        assert await get(f"http://dual.test:{port}/") < 1.0
        assert await get(f"http://[::1]:{port}/") < 1.0


@needs_ipv6
def test_ipv6_and_a_connect_timeout_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with http_server(V6) as port:
            assert await get(f"http://[::1]:{port}/") < 1.0
        with ExitStack() as stack:
            port = stuck_listener(stack, V4, 0)
            started = time.monotonic()
            with pytest.raises(httpx2.ConnectTimeout):
                async with httpx2.AsyncClient(transport=UpstreamTransport(), timeout=httpx2.Timeout(5, connect=0.3)) as client:
                    await client.get(f"http://127.0.0.1:{port}/")
            assert time.monotonic() - started < 1.5

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
