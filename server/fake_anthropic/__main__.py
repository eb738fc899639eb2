"""Run the fake as its own process: ``python -m server.fake_anthropic --port 8001``.

Prints one line, ``fake-anthropic listening on http://HOST:PORT``, once the socket is bound
(so a parent learns the port of ``--port 0``), then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from . import FakeAnthropic


async def serve(fake: FakeAnthropic, host: str, port: int) -> None:
    """Start `fake`, print the listening line, serve until SIGTERM/SIGINT."""
    url = await fake.start(host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"fake-anthropic listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.fake_anthropic", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--pace-ms", type=float, default=0.0, help="delay between streamed deltas (default model)")
    p.add_argument("--api-key", default=None, help="accept only this key (default: any non-empty key)")
    args = p.parse_args(argv)
    asyncio.run(serve(FakeAnthropic(pace_ms=args.pace_ms, api_key=args.api_key), args.host, args.port))


if __name__ == "__main__":
    main()
