"""`python -m server` on the SDK's own HTTP client for aiohttp (`anthropic.DefaultAioHttpClient`)
instead of server/upstream_transport.py: the `aiohttp` target of scripts/bench, which weighs
the two at equal settings (the same coalescing windows on the same shared grid, which
server/upstream.py applies whichever client reads). One worker only: uvicorn's spawned
workers would import the server afresh, without this swap."""

from __future__ import annotations

import os
import sys

import anthropic

from server import lifecycle
from server.__main__ import main

if __name__ == "__main__":
    if os.environ.get("WEB_CONCURRENCY", "1") != "1":
        sys.exit("bench.aiohttp_server runs one worker (WEB_CONCURRENCY=1)")
    lifecycle.make_http_client = anthropic.DefaultAioHttpClient
    sys.exit(main())
