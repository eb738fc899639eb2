"""The asyncio-native httpcore2 backend (server/upstream_transport.py) under the real SDK.

Everything runs in-process against the fake upstream; one test repeats the key paths
under uvloop (what the server runs on), and a TLS test puts a TLS-terminating relay with
a throwaway self-signed certificate in front of the fake.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator

import anthropic
import httpcore2
import httpx2
import pytest

from server.fake_anthropic import FakeAnthropic
from server.upstream_transport import AsyncioBackend, AsyncioStream, _Sweeper, make_http_client

MSG: dict[str, Any] = {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


def expected_text(n: int) -> str:
    return "".join(f"tok{i}" if i == n - 1 else f"tok{i} " for i in range(n))


def backend_of(client: anthropic.AsyncAnthropic) -> AsyncioBackend:
    backend = client._client._transport._pool._network_backend  # type: ignore[attr-defined]
    assert isinstance(backend, AsyncioBackend)
    return backend


def sse_text(raw: bytes) -> str:
    text = ""
    for line in raw.decode().splitlines():
        if line.startswith("data:"):
            event = json.loads(line[5:])
            if event.get("type") == "content_block_delta":
                text += event["delta"].get("text", "")
    return text


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    upstream = FakeAnthropic()
    await upstream.start()
    yield upstream
    await upstream.stop()


def sdk(base_url: str, timeout: float | httpx2.Timeout = 30.0, max_retries: int = 0,
        **http: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="k", base_url=base_url, max_retries=max_retries, timeout=timeout,
                                    http_client=make_http_client(timeout=timeout, **http))


async def read_stream(client: anthropic.AsyncAnthropic) -> str:
    stream = await client.messages.create(**MSG, stream=True)
    text = ""
    async for event in stream:
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
    return text


# -- the happy paths --------------------------------------------------------------------------
async def test_raw_stream_arrives_complete(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 200, "pace_ms": 1})
    client = sdk(fake.base_url)
    async with client.messages.with_streaming_response.create(**MSG, stream=True) as response:
        raw = b"".join([chunk async for chunk in response.http_response.aiter_bytes()])
    assert sse_text(raw) == expected_text(200)
    assert b"message_stop" in raw
    assert backend_of(client).connections_opened == 1
    await client.close()


async def test_sdk_stream_and_non_stream(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 50, "pace_ms": 0}, {"text": "a whole answer"})
    client = sdk(fake.base_url)
    assert await read_stream(client) == expected_text(50)
    message = await client.messages.create(**MSG)
    assert message.content[0].text == "a whole answer"  # type: ignore[union-attr]
    await client.close()


async def test_keep_alive_reuses_one_connection(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 5, "times": 4})
    client = sdk(fake.base_url)
    for _ in range(3):
        assert await read_stream(client) == expected_text(5)
    await client.messages.create(**MSG)
    assert backend_of(client).connections_opened == 1
    await client.close()


async def test_concurrent_streams(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 30, "pace_ms": 2, "times": 40})
    client = sdk(fake.base_url)
    texts = await asyncio.gather(*(read_stream(client) for _ in range(40)))
    assert texts == [expected_text(30)] * 40
    await client.close()


async def test_overloaded_then_success_is_retried(fake: FakeAnthropic) -> None:
    fake.script({"status": 529, "retry_after_ms": 1, "times": 2}, {"text": "third time lucky"})
    client = sdk(fake.base_url, max_retries=2)
    message = await client.messages.create(**MSG)
    assert message.content[0].text == "third time lucky"  # type: ignore[union-attr]
    assert [r.status for r in fake.requests] == [529, 529, 200]
    await client.close()


# -- failures ---------------------------------------------------------------------------------
async def test_dropped_connection_is_a_transport_error(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 20, "pace_ms": 1, "drop_after": 3})
    client = sdk(fake.base_url)
    with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
        async with client.messages.with_streaming_response.create(**MSG, stream=True) as response:
            async for _ in response.http_response.aiter_bytes():
                pass
    await client.close()


async def test_read_timeout(fake: FakeAnthropic) -> None:
    fake.script({"ttft_ms": 2000, "tokens": 3})
    client = sdk(fake.base_url, timeout=httpx2.Timeout(5, read=0.3))
    started = time.monotonic()
    with pytest.raises((httpx2.ReadTimeout, anthropic.APITimeoutError)):
        await read_stream(client)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.5, elapsed
    await client.close()


async def test_connect_error() -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    client = sdk(f"http://127.0.0.1:{port}")
    with pytest.raises(anthropic.APIConnectionError) as info:
        await client.messages.create(**MSG)
    assert isinstance(info.value.__cause__, httpx2.ConnectError)
    await client.close()


async def test_closing_a_stream_early_reaches_the_upstream(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 500, "pace_ms": 10})
    client = sdk(fake.base_url)
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
    await client.close()


# -- the stream on its own --------------------------------------------------------------------
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


async def test_stream_buffering_flow_control_and_errors() -> None:
    loop = asyncio.get_running_loop()
    stream = AsyncioStream(loop, _Sweeper(loop, 0.05))
    transport = _Transport()
    stream.connection_made(transport)

    stream.data_received(b"abc")
    stream.data_received(b"def")
    assert await stream.read(4) == b"abc"  # chunks are joined only up to max_bytes
    assert await stream.read(100) == b"def"

    big = b"x" * (300 * 1024)
    stream.data_received(big)
    assert transport.paused  # over the high-water mark
    got = await stream.read(64 * 1024)
    assert len(got) == 64 * 1024 and transport.paused
    while stream._buffered:
        await stream.read(64 * 1024)
    assert not transport.paused

    reader = asyncio.ensure_future(stream.read(10, timeout=5))
    await asyncio.sleep(0)
    stream.data_received(b"late")
    assert await reader == b"late"

    started = time.monotonic()
    with pytest.raises(httpcore2.ReadTimeout):
        await stream.read(10, timeout=0.05)
    assert time.monotonic() - started < 0.5

    await stream.write(b"GET / HTTP/1.1\r\n\r\n", timeout=1)
    assert transport.written == [b"GET / HTTP/1.1\r\n\r\n"]
    assert stream.get_extra_info("is_readable") is False

    stream.data_received(b"tail")
    stream.eof_received()
    assert stream.get_extra_info("is_readable") is True
    assert await stream.read(10) == b"tail"
    assert await stream.read(10) == b""  # clean EOF

    stream.connection_lost(ConnectionResetError("reset by peer"))
    with pytest.raises(httpcore2.WriteError):
        await stream.write(b"x")

    other = AsyncioStream(loop, _Sweeper(loop, 0.05))
    other.connection_made(_Transport())
    pending = asyncio.ensure_future(other.read(10))
    await asyncio.sleep(0)
    other.connection_lost(ConnectionResetError("reset by peer"))
    with pytest.raises(httpcore2.ReadError):
        await pending
    await other.aclose()
    with pytest.raises(httpcore2.ReadError):
        await other.read(10)


async def test_make_http_client_settings() -> None:
    hook_calls: list[str] = []

    async def hook(request: httpx2.Request) -> None:
        hook_calls.append(request.url.path)

    client = make_http_client(timeout=120, event_hooks={"request": [hook]})
    assert client.timeout == httpx2.Timeout(120, connect=5.0)
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert isinstance(pool._network_backend, AsyncioBackend)
    assert pool._max_connections == 1000 and pool._max_keepalive_connections == 1000
    assert client.event_hooks["request"] == [hook]
    await client.aclose()


# -- uvloop -----------------------------------------------------------------------------------
def test_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        upstream = FakeAnthropic()
        await upstream.start()
        try:
            upstream.script({"tokens": 40, "pace_ms": 1, "times": 3}, {"ttft_ms": 2000, "tokens": 3})
            client = sdk(upstream.base_url)
            assert await asyncio.gather(*(read_stream(client) for _ in range(3))) == [expected_text(40)] * 3
            slow = client.with_options(timeout=httpx2.Timeout(5, read=0.3))
            started = time.monotonic()
            with pytest.raises((httpx2.ReadTimeout, anthropic.APITimeoutError)):
                await read_stream(slow)
            assert time.monotonic() - started < 1.5
            await client.close()
        finally:
            await upstream.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


# -- TLS --------------------------------------------------------------------------------------
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


async def tls_relay(cert: Path, key: Path, target_port: int) -> asyncio.Server:
    """A TLS-terminating relay in front of the plain-HTTP fake."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)


async def test_tls(fake: FakeAnthropic, self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    relay = await tls_relay(cert, key, int(fake.base_url.rsplit(":", 1)[1]))
    port = relay.sockets[0].getsockname()[1]
    try:
        fake.script({"tokens": 100, "pace_ms": 1}, {"text": "over tls"})
        client = sdk(f"https://localhost:{port}", verify=ssl.create_default_context(cafile=str(cert)))
        assert await read_stream(client) == expected_text(100)
        async with client.messages.with_streaming_response.create(**MSG) as response:
            assert response.http_response.extensions["network_stream"].get_extra_info("ssl_object") is not None
            assert "over tls" in (await response.http_response.aread()).decode()
        assert backend_of(client).connections_opened == 1
        await client.close()

        untrusting = sdk(f"https://localhost:{port}")  # the system CAs do not know our certificate
        with pytest.raises(anthropic.APIConnectionError) as info:
            await untrusting.messages.create(**MSG)
        assert isinstance(info.value.__cause__, httpx2.ConnectError)
        await untrusting.close()
    finally:
        relay.close()
        await relay.wait_closed()
