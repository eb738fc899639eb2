"""CPU of one streamed model call in this process: the SDK's `client.post`, our `PreparedCall`, and
the floor (a prebuilt request on the same http client: no retry loop, no header building).

    .venv/bin/python -m bench.upstream_call [calls] [rounds]

Each round runs `calls` 5-token calls, 50 at a time, through each path in turn, against the fake
(bench/fake.py, its own process); CPU is this process's only (time.process_time).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable

import anthropic
import httpx2

from server import metrics
from server.upstream import PreparedCall, UpstreamStream, encode_request
from server.upstream_transport import make_http_client

PARAMS = {"model": "claude-sonnet-4-5", "max_tokens": 64,
          "messages": [{"role": "user", "content": [{"type": "text", "text": '#fake{"tokens":5} short turn'}]}]}


async def read(response: httpx2.Response) -> None:
    stream = UpstreamStream(response, 0.0)
    try:
        async for _ in stream.events():
            pass
    finally:
        await stream.aclose()


async def cpu_per_call(send: Callable[[], Awaitable[httpx2.Response]], calls: int) -> float:
    """Microseconds of CPU per call, `calls` calls 50 at a time (after 50 to warm up)."""
    for _ in range(50):
        await read(await send())
    gate = asyncio.Semaphore(50)

    async def one() -> None:
        async with gate:
            await read(await send())

    start = time.process_time()
    await asyncio.gather(*(one() for _ in range(calls)))
    return (time.process_time() - start) / calls * 1e6


async def main(calls: int, rounds: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "bench.fake"], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split()[-1]  # type: ignore[union-attr]
        client = anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=2, timeout=60,
                                          http_client=metrics.instrumented_http_client(make_http_client, timeout=60))
        prepared, sdk = PreparedCall(client), PreparedCall(client)
        sdk.direct = False  # (client.post)
        body = encode_request(PARAMS)
        head = [*prepared.headers, (b"x-stainless-retry-count", b"0")]

        async def floor() -> httpx2.Response:
            request = httpx2.Request("POST", prepared.url, headers=head, content=body, extensions=prepared.extensions)
            return await client._client.send(request, stream=True)

        paths: dict[str, Callable[[], Awaitable[Any]]] = {
            "client.post": lambda: sdk.send(body, None), "prepared": lambda: prepared.send(body, None),
            "floor": floor}
        figures: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, send in paths.items():
                figures[name].append(await cpu_per_call(send, calls))
        for name, values in figures.items():
            print(f"{name:12} {' '.join(f'{v:5.0f}' for v in values)} µs of CPU per call")
        await client.close()
    finally:
        proc.terminate()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000, int(sys.argv[2]) if len(sys.argv) > 2 else 3))
