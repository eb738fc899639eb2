"""The project's fake Anthropic API (server.fake_anthropic), run on uvloop for the benchmark.

Same class and wire format as `python -m server.fake_anthropic`; only the event loop differs,
so the fake spends less of the box's two cores while it paces 400 streams. Prints the same
`fake-anthropic listening on http://...` line, serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop

from server.fake_anthropic import FakeAnthropic
from server.fake_anthropic.__main__ import serve


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--asyncio", action="store_true", help="plain asyncio loop instead of uvloop")
    args = p.parse_args()
    # keep few recorded requests: the benchmark never reads them back
    fake = FakeAnthropic(pace_ms=0, max_recorded=100)
    (asyncio.run if args.asyncio else uvloop.run)(serve(fake, "127.0.0.1", args.port))


if __name__ == "__main__":
    main()
