"""Slow clients (#7): a request head or body that trickles in, or never comes, is timed out
(HEADER_TIMEOUT_SECONDS at the protocol level, BODY_TIMEOUT_SECONDS in the middleware);
long answers, SSE streams, WebSockets and idle keep-alive connections are not.

Raw sockets against a real server with 1 s timeouts; bounds are generous (timeout + 4 s).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Iterator

import httpx
import pytest
import websockets

from .harness import Server, server_env, sse_events, ws_turn

TIMEOUT = 1.0
SLACK = 4.0


@pytest.fixture(scope="module")
def server(fake, redis_url) -> Iterator[Server]:
    srv = Server(server_env(fake, redis_url, HEADER_TIMEOUT_SECONDS=TIMEOUT, BODY_TIMEOUT_SECONDS=TIMEOUT),
                 name="slow-clients").start()
    yield srv
    srv.stop()


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    data = b""
    deadline = time.monotonic() + within
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
        if not chunk:
            return data
        data += chunk


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 10)
    return status, headers, body


def parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return int(lines[0].split()[1]), headers, json.loads(body)


def assert_request_timeout(status: int, headers: dict[str, str], body: dict) -> None:
    assert status == 408, (status, body)
    assert headers["content-type"].startswith("application/json")
    assert headers.get("connection") == "close"
    error = body["error"]
    assert error["code"] == "request_timeout" and error["retryable"] is True and error["message"]


async def read_while_sending(reader: asyncio.StreamReader, send) -> bytes:  # type: ignore[no-untyped-def]
    """Everything the server writes until it closes, while `send()` dribbles the request."""
    sender = asyncio.create_task(send())
    try:
        return await read_until_closed(reader, TIMEOUT + SLACK)
    finally:
        sender.cancel()


async def test_a_stalled_request_head_gets_408_and_is_closed(server):
    reader, writer = await connect(server)
    writer.write(b"POST /agent HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
    await writer.drain()
    raw = await read_until_closed(reader, TIMEOUT + SLACK)
    assert_request_timeout(*parse(raw))
    writer.close()


async def test_a_trickled_request_head_is_bounded_too(server):
    reader, writer = await connect(server)
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    started = time.monotonic()

    async def trickle() -> None:
        for byte in head:  # one byte every 50 ms: 10 s for the whole head, never complete
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)

    raw = await read_while_sending(reader, trickle)
    assert time.monotonic() - started < TIMEOUT + SLACK
    assert_request_timeout(*parse(raw))
    writer.close()


async def test_a_connection_that_sends_nothing_is_closed(server):
    reader, writer = await connect(server)
    assert await read_until_closed(reader, TIMEOUT + SLACK) == b"", "closed without a response"
    writer.close()


@pytest.mark.parametrize("trickle", [False, True])
async def test_a_stalled_or_trickled_body_gets_408(server, trickle):
    reader, writer = await connect(server)
    writer.write(b"POST /agent HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"message\": \"")
    await writer.drain()

    async def send_slowly() -> None:
        while trickle:
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.1)

    raw = await read_while_sending(reader, send_slowly)
    assert_request_timeout(*parse(raw))
    writer.close()


async def test_long_answers_and_streams_are_not_cut(server, upstream):
    """A slow-but-progressing answer lasting longer than both timeouts, as JSON, as SSE and
    over a WebSocket that stayed idle for longer than both first."""
    upstream.script(*[{"tokens": 30, "pace_ms": 100}] * 3)
    full = " ".join(f"tok{i}" for i in range(30))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        started = time.monotonic()
        r = await client.post("/agent", json={"message": "slow json"})
        assert r.status_code == 200 and r.json()["text"] == full
        async with client.stream("POST", "/agent/stream", json={"message": "slow sse"}) as stream:
            assert stream.status_code == 200
            lines = [line async for line in stream.aiter_lines()]
        events = sse_events(lines)
        assert events[-1]["type"] == "turn_end" and events[-1]["text"] == full
        assert time.monotonic() - started > 2 * TIMEOUT, "the answers outlasted the timeouts"
    async with websockets.connect(f"{server.ws_url}/agent/ws") as ws:
        await asyncio.sleep(2.5 * TIMEOUT)
        events = await ws_turn(ws, "slow ws")
        assert events[-1]["type"] == "turn_end" and events[-1]["text"] == full


async def test_an_idle_keep_alive_connection_serves_its_next_request(server):
    """Between requests uvicorn's keep-alive timeout (5 s) applies, not the head timeout;
    the next request's head is timed from its first byte."""
    reader, writer = await connect(server)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    writer.write(request)
    status, _, _ = await read_response(reader)
    assert status == 200
    await asyncio.sleep(2 * TIMEOUT)  # idle longer than the head timeout, within keep-alive
    writer.write(request)
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["status"] == "ok"
    writer.write(b"GET /health HTTP/1.1\r\nHo")  # a third request that stalls
    await writer.drain()
    raw = await read_until_closed(reader, TIMEOUT + SLACK)
    assert_request_timeout(*parse(raw))
    writer.close()


async def test_the_rest_of_a_refused_body_cannot_hold_the_connection(server):
    """A request refused before its body was read (here: a foreign Origin, 403): trickling
    the rest of that body does not keep the connection open."""
    reader, writer = await connect(server)
    writer.write(b"POST /agent HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    await writer.drain()
    status, _, body = await read_response(reader)
    assert status == 403 and json.loads(body)["error"]["code"] == "forbidden_origin"

    async def trickle() -> None:
        while True:
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.1)

    sender = asyncio.create_task(trickle())
    try:
        assert await read_until_closed(reader, TIMEOUT + SLACK) == b""
    finally:
        sender.cancel()
    writer.close()
