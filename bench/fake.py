"""The project's fake Anthropic API (server.fake_anthropic), run on uvloop for the benchmark.

Same class and wire format as `python -m server.fake_anthropic`; only the event loop differs,
so the fake spends less of the box's two cores while it paces 400 streams. Prints the same
`fake-anthropic listening on http://...` line, serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from server.fake_anthropic import FakeAnthropic


async def serve(port: int) -> None:
    # keep few recorded requests: the benchmark never reads them back
    fake = FakeAnthropic(pace_ms=0, max_recorded=100)
    url = await fake.start("127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(f"fake-anthropic listening on {url}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--asyncio", action="store_true", help="plain asyncio loop instead of uvloop")
    args = p.parse_args()
    (asyncio.run if args.asyncio else uvloop.run)(serve(args.port))


if __name__ == "__main__":
    main()
