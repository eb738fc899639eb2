"""The SDK's upstream transport (server/upstream_transport.py) under the real SDK.

Everything runs in-process against the fake upstream or small raw servers over real sockets;
one test repeats the key paths under uvloop (what the server runs on), and the TLS tests put
a TLS-terminating relay with a throwaway self-signed certificate in front of the fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import json
import shutil
import socket
import ssl
import subprocess
import time
import weakref
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import anthropic
import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import UpstreamStreamError
from server.events import text_delta
from server.fake_anthropic import FakeAnthropic
from server.upstream import TextDelta, UpstreamStream, _parse_block, open_stream
from server.upstream_transport import (
    LINGER_TICK,
    Connection,
    UpstreamTransport,
    direct_body,
    make_http_client,
    window_end,
)

MSG: dict[str, Any] = {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def expected_text(n: int) -> str:
    return "".join(f"tok{i}" if i == n - 1 else f"tok{i} " for i in range(n))


def port_of(fake: FakeAnthropic) -> int:
    return int(fake.base_url.rsplit(":", 1)[1])


def transport_of(response: httpx2.Response) -> UpstreamTransport:
    """The transport a response came through (ours, or the test fails)."""
    body = direct_body(response)
    assert body is not None
    return body.pool


def as_dict(event: Any) -> dict[str, Any]:
    """An event from `UpstreamStream.events()` in the API's own shape (text deltas come as `TextDelta`)."""
    if isinstance(event, TextDelta):
        return {"type": "content_block_delta", "index": event.index, "delta": {"type": "text_delta", "text": event.text}}
    return event


def sse_text(raw: bytes) -> str:
    text = ""
    for line in raw.decode().splitlines():
        if line.startswith("data:"):
            event = json.loads(line[5:])
            if event.get("type") == "content_block_delta":
                text += event["delta"].get("text", "")
    return text


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy from the environment unless a test sets one."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    upstream = FakeAnthropic()
    await upstream.start()
    yield upstream
    await upstream.stop()


def sdk(base_url: str, timeout: float | httpx2.Timeout = 30.0, max_retries: int = 0,
        **http: Any) -> anthropic.AsyncAnthropic:
    """An SDK client on `make_http_client` (use it as `async with`: closed at the end)."""
    return anthropic.AsyncAnthropic(api_key="k", base_url=base_url, max_retries=max_retries, timeout=timeout,
                                    http_client=make_http_client(timeout=timeout, **http))


async def read_stream(client: anthropic.AsyncAnthropic) -> str:
    stream = await client.messages.create(**MSG, stream=True)
    text = ""
    async for event in stream:
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
    return text


async def read_events(client: anthropic.AsyncAnthropic, coalesce: float = 0.0) -> list[dict[str, Any] | TextDelta]:
    async with open_stream(client, MSG, coalesce) as upstream:
        return [event async for event in upstream.events()]


@asynccontextmanager
async def raw_server(serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                     host: str = "127.0.0.1") -> AsyncIterator[str]:
    """A plain asyncio server running `serve` per connection; yields its base URL."""
    server = await asyncio.start_server(serve, host, 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


# -- the happy paths --------------------------------------------------------------------------
async def test_raw_stream_arrives_complete(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 200, "pace_ms": 1})
    async with sdk(fake.base_url) as client:
        async with client.messages.with_streaming_response.create(**MSG, stream=True) as response:
            raw = b"".join([chunk async for chunk in response.http_response.aiter_bytes()])
        assert sse_text(raw) == expected_text(200)
        assert b"message_stop" in raw
        assert transport_of(response.http_response).connections_opened == 1


async def test_sdk_stream_and_non_stream(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 50, "pace_ms": 0}, {"text": "a whole answer"})
    async with sdk(fake.base_url) as client:
        assert await read_stream(client) == expected_text(50)
        message = await client.messages.create(**MSG)
        assert message.content[0].text == "a whole answer"  # type: ignore[union-attr]


async def test_keep_alive_reuses_one_connection(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 5, "times": 4})
    async with sdk(fake.base_url) as client:
        for _ in range(3):
            assert await read_stream(client) == expected_text(5)
        response = await client.messages.with_raw_response.create(**MSG)
        assert transport_of(response.http_response).connections_opened == 1


async def test_concurrent_streams(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 30, "pace_ms": 2, "times": 40})
    async with sdk(fake.base_url) as client:
        texts = await asyncio.gather(*(read_stream(client) for _ in range(40)))
    assert texts == [expected_text(30)] * 40


async def test_overloaded_then_success_is_retried(fake: FakeAnthropic) -> None:
    fake.script({"status": 529, "retry_after_ms": 1, "times": 2}, {"text": "third time lucky"})
    async with sdk(fake.base_url, max_retries=2) as client:
        message = await client.messages.create(**MSG)
    assert message.content[0].text == "third time lucky"  # type: ignore[union-attr]
    assert [r.status for r in fake.requests] == [529, 529, 200]


async def test_interim_answers_are_skipped() -> None:
    """A `103 Early Hints` or `100 Continue` before the answer: the whole body that follows
    is read, through the transport and through a turn's event stream."""
    events = [{"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "early"}},
              {"type": "message_stop"}]
    sse = b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):  # (the client is gone)
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.02)  # the interim answers and the answer in separate reads
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                await asyncio.sleep(0.02)
                for i in range(0, len(sse), 40):
                    writer.write(chunk(sse[i:i + 40]))
                writer.write(b"0\r\n\r\n")

    async with raw_server(serve) as url, sdk(url) as client:
        async with client.messages.with_streaming_response.create(**MSG, stream=True) as response:
            assert response.http_response.status_code == 200
            assert "link" not in response.http_response.headers  # (the hints' headers are not the answer's)
            assert await response.http_response.aread() == sse
        assert [as_dict(e) for e in await read_events(client, 0.01)] == events
        assert transport_of(response.http_response).connections_opened == 1  # kept alive through both


# -- failures ---------------------------------------------------------------------------------
async def test_dropped_connection_is_a_transport_error(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 20, "pace_ms": 1, "drop_after": 3})
    async with sdk(fake.base_url) as client:
        with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
            async with client.messages.with_streaming_response.create(**MSG, stream=True) as response:
                async for _ in response.http_response.aiter_bytes():
                    pass


async def test_read_timeout(fake: FakeAnthropic) -> None:
    fake.script({"ttft_ms": 2000, "tokens": 3})
    async with sdk(fake.base_url, timeout=httpx2.Timeout(5, read=0.3)) as client:
        started = time.monotonic()
        with pytest.raises((httpx2.ReadTimeout, anthropic.APITimeoutError)):
            await read_stream(client)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.5, elapsed


async def test_connect_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    async with sdk(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(anthropic.APIConnectionError) as info:
            await client.messages.create(**MSG)
    assert isinstance(info.value.__cause__, httpx2.ConnectError)


async def test_closing_a_stream_early_reaches_the_upstream(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 500, "pace_ms": 10})
    async with sdk(fake.base_url) as client:
        stream = await client.messages.create(**MSG, stream=True)
        seen = 0
        async for event in stream:
            seen += event.type == "content_block_delta"
            if seen == 3:
                break
        await stream.close()
        deadline = time.monotonic() + 3
        while not fake.requests[-1].closed_early and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    assert fake.requests[-1].closed_early
    assert not fake.requests[-1].finished


# -- the connection on its own ----------------------------------------------------------------
class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.closed = False
        self.written: list[bytes] = []

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def sent_request(head: bytes = b"GET / HTTP/1.1\r\n\r\n", body: bytes = b"") -> tuple[Connection, _Transport]:
    """A connection on a fake socket that has sent one request."""
    loop = asyncio.get_running_loop()
    conn, transport = Connection(loop, (b"http", b"example", 80)), _Transport()
    conn.connection_made(transport)
    await conn.send(head, body, timeout=1)
    return conn, transport


async def test_connection_parsing_flow_control_and_errors() -> None:
    conn, transport = await sent_request(b"POST /v1/messages HTTP/1.1\r\nHost: example\r\n\r\n", b"{}")
    assert transport.written == [b"POST /v1/messages HTTP/1.1\r\nHost: example\r\n\r\n{}"]

    head = asyncio.ensure_future(conn.receive_head(timeout=5))
    conn.data_received(HEAD[:20])  # a head split across reads
    await asyncio.sleep(0)
    assert not head.done()
    conn.data_received(HEAD[20:] + chunk(b"abc") + chunk(b"def"))
    await head
    assert conn.status == 200 and (b"Content-Type", b"text/event-stream") in conn.headers
    assert conn.take() == b"abcdef"  # chunks that arrived together come out as one piece

    conn.data_received(chunk(b"x" * (300 * 1024)))
    assert transport.paused  # over the high-water mark
    assert len(conn.take()) == 300 * 1024 and not transport.paused

    started = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        await conn._wait(0.05, httpx2.ReadTimeout)
    assert time.monotonic() - started < 0.5

    conn.data_received(b"0\r\n\r\n")
    assert conn.complete and conn.keep_alive()  # reusable for the next request

    broken, _ = await sent_request()
    waiting = asyncio.ensure_future(broken.receive_head(timeout=5))
    await asyncio.sleep(0)
    broken.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    with pytest.raises(httpx2.RemoteProtocolError):
        await waiting
    assert not broken.keep_alive()

    cut, _ = await sent_request()
    cut.data_received(HEAD + chunk(b"part"))
    await cut.receive_head(timeout=1)
    cut.connection_lost(ConnectionResetError("reset by peer"))
    assert cut.take() == b"part"
    with pytest.raises(httpx2.ReadError):
        cut._raise_if_broken()
    with pytest.raises(httpx2.WriteError):
        await cut.send(b"GET / HTTP/1.1\r\n\r\n", b"", timeout=1)

    hinted, _ = await sent_request()  # an interim answer in the same read as the answer
    hinted.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + HEAD + chunk(b"body"))
    await hinted.receive_head(timeout=1)
    assert hinted.status == 200 and not hinted.complete and hinted.take() == b"body"
    assert (b"Link", b"</a>") not in hinted.headers and hinted.reason == b"OK"
    hinted.data_received(b"0\r\n\r\n")
    assert hinted.complete and hinted.keep_alive()


async def test_make_http_client_settings(fake: FakeAnthropic) -> None:
    hook_calls: list[str] = []

    async def hook(request: httpx2.Request) -> None:
        hook_calls.append(request.url.path)

    async with make_http_client(timeout=120, event_hooks={"request": [hook]}) as client:
        assert client.timeout == httpx2.Timeout(120, connect=5.0)
        assert client.event_hooks["request"] == [hook]
        transport = transport_of(await client.get(f"{fake.base_url}/nothing-here"))
        assert transport._max_keepalive == 1000 and transport._slots is not None and transport._slots._value == 1000
        assert hook_calls == ["/nothing-here"]


@asynccontextmanager
async def closing_server(answer: bytes) -> AsyncIterator[tuple[str, list[int]]]:
    """A server that answers every request on a connection with `answer`, then closes it
    without saying so; yields its URL and the requests it served."""
    served: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        served.append(1)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with raw_server(serve) as url:
        yield url + "/", served


async def test_a_connection_closed_while_idle_is_replaced() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    transport = UpstreamTransport()
    async with closing_server(answer) as (url, served), httpx2.AsyncClient(transport=transport) as client:
        for _ in range(3):
            assert (await client.get(url)).text == "ok"
            await asyncio.sleep(0.15)  # the server has closed the kept-alive connection by now
        assert len(served) == 3 and transport.connections_opened == 3


async def test_a_body_delimited_by_the_close() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    async with closing_server(answer) as (url, _), httpx2.AsyncClient(transport=UpstreamTransport()) as client:
        assert (await client.get(url)).text == "until the end"


async def test_malformed_answer_and_pool_timeout(fake: FakeAnthropic) -> None:
    async with httpx2.AsyncClient(transport=UpstreamTransport(max_connections=1)) as client:
        async with closing_server(b"HTTP/1.1 2OO OK\r\n\r\n") as (url, _):
            with pytest.raises(httpx2.RemoteProtocolError):
                await client.get(url)

        fake.script({"tokens": 3, "ttft_ms": 1000})
        async with client.stream("POST", f"{fake.base_url}/v1/messages", json={**MSG, "stream": True}):
            with pytest.raises(httpx2.PoolTimeout):  # the one connection is busy
                await client.post(f"{fake.base_url}/v1/messages", json=MSG, timeout=httpx2.Timeout(5, pool=0.1))


async def test_a_streamed_request_body_goes_out_chunked(fake: FakeAnthropic) -> None:
    fake.script({"text": "ok"})
    payload = json.dumps(MSG).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 7):
            yield payload[i:i + 7]

    async with httpx2.AsyncClient(transport=UpstreamTransport()) as client:
        response = await client.post(f"{fake.base_url}/v1/messages", content=pieces(),
                                     headers={"x-api-key": "k", "content-type": "application/json"})
    assert response.status_code == 200 and response.json()["content"][0]["text"] == "ok"
    assert fake.requests[-1].body["model"] == MSG["model"]


async def test_keepalive_expiry(fake: FakeAnthropic) -> None:
    transport = UpstreamTransport(keepalive_expiry=0.1)
    async with httpx2.AsyncClient(transport=transport) as client:
        for pause in (0, 0.2, 0):
            await asyncio.sleep(pause)
            assert (await client.get(f"{fake.base_url}/nothing-here")).status_code == 404
        assert transport.connections_opened == 2  # reused at once, replaced after the expiry
        await asyncio.gather(*(client.get(f"{fake.base_url}/nothing-here") for _ in range(5)))
        await asyncio.sleep(0.2)
        await client.get(f"{fake.base_url}/nothing-here")
        assert transport._idle_count == 1  # the expired ones were dropped as they were met


# -- uvloop -----------------------------------------------------------------------------------
def test_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        upstream = FakeAnthropic()
        await upstream.start()
        upstream.script({"tokens": 40, "pace_ms": 1, "times": 3}, {"ttft_ms": 2000, "tokens": 3})
        async with sdk(upstream.base_url) as client:
            assert await asyncio.gather(*(read_stream(client) for _ in range(3))) == [expected_text(40)] * 3
            slow = client.with_options(timeout=httpx2.Timeout(5, read=0.3))
            started = time.monotonic()
            with pytest.raises((httpx2.ReadTimeout, anthropic.APITimeoutError)):
                await read_stream(slow)
            assert time.monotonic() - started < 1.5
        await upstream.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


# -- TLS and proxies --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        print("skipping TLS test: openssl is not installed")
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, timeout=60,
    )
    if result.returncode != 0:
        print(f"skipping TLS test: openssl failed: {result.stderr.decode()[-300:]}")
        pytest.skip("openssl could not make a certificate")
    return cert, key


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@asynccontextmanager
async def tls_relay(cert: Path, key: Path, target_port: int) -> AsyncIterator[int]:
    """A TLS-terminating relay in front of the plain-HTTP fake; yields its port."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    relay = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    try:
        yield relay.sockets[0].getsockname()[1]
    finally:
        relay.close()
        await relay.wait_closed()


async def test_tls(fake: FakeAnthropic, self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    async with tls_relay(cert, key, port_of(fake)) as port:
        fake.script({"tokens": 100, "pace_ms": 1}, {"text": "over tls"})
        async with sdk(f"https://localhost:{port}", verify=ssl.create_default_context(cafile=str(cert))) as client:
            assert await read_stream(client) == expected_text(100)
            async with client.messages.with_streaming_response.create(**MSG) as response:
                assert response.http_response.extensions["network_stream"].get_extra_info("ssl_object") is not None
                assert "over tls" in (await response.http_response.aread()).decode()
            assert transport_of(response.http_response).connections_opened == 1

        async with sdk(f"https://localhost:{port}") as untrusting:  # the system CAs do not know our certificate
            with pytest.raises(anthropic.APIConnectionError) as info:
                await untrusting.messages.create(**MSG)
        assert isinstance(info.value.__cause__, httpx2.ConnectError)


@asynccontextmanager
async def forward_proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """A forward proxy (CONNECT tunnels, and plain HTTP requests in absolute form, one per
    connection); yields its URL and the request lines it served."""
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, rest = head.split(b" ", 2)
        seen.append(f"{method.decode()} {target.decode()}")
        if method == b"CONNECT":
            host, port = target.rsplit(b":", 1)
            up_reader, up_writer = await asyncio.open_connection(host.decode(), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = httpx2.URL(target.decode())
            up_reader, up_writer = await asyncio.open_connection(url.host, url.port)
            up_writer.write(b"%b %b %b" % (method, url.raw_path, rest))
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async with raw_server(serve) as url:
        yield url, seen


async def test_proxies_from_the_environment(fake: FakeAnthropic, self_signed: tuple[Path, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPS_PROXY / HTTP_PROXY are obeyed (by the SDK's own client, not our transport) and
    NO_PROXY exempts a host; without them requests go straight through our transport."""
    cert, key = self_signed
    verify = ssl.create_default_context(cafile=str(cert))
    fake.script({"text": "proxied", "times": 5})
    async with forward_proxy() as (proxy_url, seen), tls_relay(cert, key, port_of(fake)) as port:
        monkeypatch.setenv("HTTPS_PROXY", proxy_url)
        async with sdk(f"https://localhost:{port}", verify=verify) as client:
            response = await client.messages.with_raw_response.create(**MSG)
            assert direct_body(response.http_response) is None  # httpx2's proxy transport, not ours
            assert (await response.parse()).content[0].text == "proxied"  # type: ignore[union-attr]
        assert seen == [f"CONNECT localhost:{port}"]

        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        async with sdk(fake.base_url) as client:
            assert (await client.messages.create(**MSG)).content[0].text == "proxied"  # type: ignore[union-attr]
        assert seen[1:] == [f"POST {fake.base_url}/v1/messages"]

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with sdk(fake.base_url) as client:
            assert (await client.messages.create(**MSG)).content[0].text == "proxied"  # type: ignore[union-attr]
        assert len(seen) == 2  # straight to the upstream

        for name in PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        async with sdk(fake.base_url) as client:
            response = await client.messages.with_raw_response.create(**MSG)
            assert isinstance(transport_of(response.http_response), UpstreamTransport)
        assert len(seen) == 2


# -- server.upstream on top of it -------------------------------------------------------------
async def test_upstream_stream_direct_and_through_httpx2_decoding(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 30, "pace_ms": 0})
    seen: list[weakref.ref[httpx2.Response]] = []

    async def keep_a_weak_ref(response: httpx2.Response) -> None:
        assert direct_body(response) is not None  # our transport, no encoding: direct reads
        seen.append(weakref.ref(response))

    async with sdk(fake.base_url, event_hooks={"response": [keep_a_weak_ref]}) as client:
        async with open_stream(client, MSG) as upstream:
            gc.collect()
            assert seen and seen[0]() is None  # request, response and their headers are not held while streaming
            events = [as_dict(e) async for e in upstream.events()]
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    assert "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta") == expected_text(30)
    assert fake.requests[-1].body["stream"] is True

    sse = b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events)
    encoded = httpx2.Response(200, headers={"content-encoding": "gzip"}, content=gzip.compress(sse))
    assert direct_body(encoded) is None  # decoded by httpx2 instead
    assert [as_dict(e) async for e in UpstreamStream(encoded).events()] == events


async def test_coalescing_handles_tokens_in_bursts(fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> None:
    """STREAM_COALESCE_MS: after the first token the body is read once per window, so tokens
    come out in bursts (one wake-up and one client write each) instead of one by one; from
    the second window on the socket itself is read once per window."""
    pieces = 0
    received = Connection.data_received

    def counting(self: Connection, data: bytes) -> None:
        nonlocal pieces
        pieces += 1
        received(self, data)

    monkeypatch.setattr(Connection, "data_received", counting)
    fake.script({"tokens": 40, "pace_ms": 5, "times": 2})
    loop = asyncio.get_running_loop()

    async def bursts(coalesce: float) -> tuple[int, str]:
        nonlocal pieces
        times, text, pieces = [], "", 0
        async with open_stream(client, MSG, coalesce) as upstream:
            async for event in upstream.events():
                if isinstance(event, TextDelta):
                    times.append(loop.time())
                    text += event.text
        return 1 + sum(b - a > 0.002 for a, b in zip(times, times[1:])), text

    async with sdk(fake.base_url) as client:
        one_by_one, text = await bursts(0.0)
        assert text == expected_text(40) and one_by_one > 20 and pieces > 20
        coalesced, text = await bursts(0.05)
        assert text == expected_text(40) and coalesced <= 8, coalesced
        assert pieces <= 20, pieces  # the first window's ~10 pieces one by one, then one read per window

        # An answer that ends within the first window is read as soon as its end arrives...
        fake.script({"tokens": 10, "pace_ms": 5})
        started = loop.time()
        coalesced, text = await bursts(2.0)
        assert text == expected_text(10) and coalesced <= 2
        assert loop.time() - started < 1.0
        # ... a longer one at most one window after its end.
        fake.script({"tokens": 30, "pace_ms": 10})
        started = loop.time()
        coalesced, text = await bursts(0.1)
        assert text == expected_text(30) and coalesced <= 5, coalesced
        assert loop.time() - started < 0.3 + 0.1 + 0.3


@given(now=st.floats(min_value=0, max_value=1e6), later=st.floats(min_value=0, max_value=1),
       seconds=st.sampled_from([0.001, 0.01, 0.02, 0.04, 0.05, 0.08, 0.1, 0.2]))
def test_coalescing_windows_end_on_a_shared_grid(now: float, later: float, seconds: float) -> None:
    """Windows end on a grid of LINGER_TICK (an eighth of a shorter window), never early and
    at most a tick late, so the windows of streams opened within one tick of each other end
    together (one wake-up of the worker for all of them)."""
    tick = min(LINGER_TICK, seconds / 8)
    end = window_end(now, seconds)
    assert now + seconds - 1e-6 <= end < now + seconds + tick + 1e-6
    assert abs(end / tick - round(end / tick)) < 1e-4
    other = now + later * tick  # opened up to one tick later: the same end, or the next tick
    assert round(window_end(other, seconds) / tick) - round(end / tick) in (0, 1)
    assert other + seconds - 1e-6 <= window_end(other, seconds)


async def test_a_stall_after_a_window_is_a_read_timeout(fake: FakeAnthropic) -> None:
    """Waiting past a coalescing window for the next piece keeps the read timeout."""
    fake.script({"tokens": 3, "pace_ms": 3000})
    async with sdk(fake.base_url, timeout=httpx2.Timeout(5, read=0.3)) as client:
        started = time.monotonic()
        with pytest.raises(UpstreamStreamError) as caught:
            await read_events(client, 0.05)
    assert caught.value.error_type == "timeout_error"
    assert time.monotonic() - started < 2.0


class Pieces(httpx2.AsyncByteStream):
    """A body from another transport: `wire` in pieces of `size` bytes."""

    def __init__(self, wire: bytes, size: int) -> None:
        self.wire, self.size = wire, size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.wire), self.size):
            yield self.wire[i:i + self.size]


async def test_sse_parsing_across_awkward_chunk_boundaries() -> None:
    """Reads cut anywhere (inside a UTF-8 character, between \\r and \\n) give the same events."""
    events = [{"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "héllo ✓"}},
              {"type": "message_stop"}]
    wire = b": a comment\r\n\r\nevent: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n"
    wire += b"".join(b"event: %s\r\ndata: %s\r\n\r\n" % (e["type"].encode(), json.dumps(e, ensure_ascii=False).encode())
                     for e in events)

    for size in (1, 2, 3, 7, 64, len(wire)):
        got = [as_dict(e) async for e in UpstreamStream(httpx2.Response(200, stream=Pieces(wire, size))).events()]
        assert got == [{"type": "ping"}, *events], size

    wire = wire.replace("✓".encode(), b"\xff")  # not UTF-8: replaced, the stream goes on
    got = [as_dict(e) async for e in UpstreamStream(httpx2.Response(200, stream=Pieces(wire, 5))).events()]
    assert got[2]["delta"]["text"] == "héllo \ufffd" and got[-1] == {"type": "message_stop"}


async def test_another_transports_body_lingers_until_the_shared_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body that is not from our transport is coalesced too: the reader sleeps until the
    window's tick on the shared grid."""
    delta = b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}\n\n'
    wire = delta * 2 + b'data: {"type":"message_stop"}\n\n'
    loop = asyncio.get_running_loop()
    sleeps: list[float] = []  # when each linger ends
    sleep, clock, read = asyncio.sleep, loop.time, [0.0]

    def time() -> float:  # (the `now` the linger read: a later reading would be late by a busy box's lag)
        read[0] = clock()
        return read[0]

    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(asyncio, "sleep", lambda delay: sleeps.append(read[0] + delay) or sleep(delay))
    stream = UpstreamStream(httpx2.Response(200, stream=Pieces(wire, len(delta))), coalesce=0.08)
    times = [loop.time() async for _ in stream.events()]
    assert len(times) == 3 and times[1] - times[0] >= 0.08 - 1e-3
    assert len(sleeps) == 2 and all(abs(end / LINGER_TICK - round(end / LINGER_TICK)) < 0.01 for end in sleeps)


texts = st.text(st.characters(codec="utf-8"), max_size=30)
block_prefixes = st.sampled_from(["data: ", "data:", "event: x\ndata: ", "event: content_block_delta\ndata: "])


@settings(max_examples=300, deadline=None)
@given(texts, st.integers(0, 12), st.booleans(), st.booleans(), block_prefixes)
def test_text_deltas_read_without_a_parse_match_the_json(text: str, index: int, ascii_only: bool,
                                                         compact: bool, prefix: str) -> None:
    """A text delta in the API's usual form is read by a fast path; whatever the text and
    the encoder's choices (escapes, spacing), it gives what a JSON parse gives, and the
    event we emit from it is valid JSON carrying the same text."""
    event = {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}
    data = json.dumps(event, ensure_ascii=ascii_only, separators=(",", ":") if compact else None)
    buffer = f"{prefix}{data}\n\nevent: next\ndata: {{}}\n\n"
    got = _parse_block(buffer, 0, buffer.index("\n\n"))
    assert isinstance(got, TextDelta) and (got.index, got.text) == (index, text)
    assert (got.json is not None) == compact  # the fast path takes the compact form only
    emitted = json.loads(text_delta("T", 3, got.text, got.json).data)
    assert emitted == {"type": "text_delta", "id": "T:3", "text": text}


def test_text_delta_lookalikes_take_the_parsing_path() -> None:
    head = '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
    for data, expected in [
        (head + '"a","extra":1}}', {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": "a"}}),
        (head + '"a\\u00e9"}, "more": 2}', {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": "aé"}}),
        (head + '"unterminated}}', None),
        ('{"type":"content_block_delta","index":x,"delta":{"type":"text_delta","text":"a"}}', None),
    ]:
        for prefix in ("data: ", "event: content_block_delta\ndata: "):
            buffer = f"{prefix}{data}\n\n"
            got = _parse_block(buffer, 0, len(buffer) - 2)
            assert not (isinstance(got, TextDelta) and got.json is not None), data
            assert (as_dict(got) if got is not None else None) == expected, data
