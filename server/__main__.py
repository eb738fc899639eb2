"""`python -m server` (what scripts/run calls): validate the configuration once, say
loudly what is real and what is not, then hand over to uvicorn with matching flags."""

from __future__ import annotations

import contextlib
import sys

import uvicorn
from dotenv import load_dotenv
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from .config import ConfigError, Settings
from .metrics import prepare_supervisor


def main() -> int:
    load_dotenv()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    banner = [f"agent server on http://{settings.host}:{settings.port} "
              f"({settings.web_concurrency} worker{'s' if settings.web_concurrency > 1 else ''})"]
    if settings.offline:
        banner.append("!! OFFLINE MODE: ANTHROPIC_API_KEY is not set. Answers come from the bundled "
                      "offline model, not from Claude. Set ANTHROPIC_API_KEY in .env for real answers.")
    if not settings.redis_url:
        banner.append("!! IN-MEMORY SESSIONS: REDIS_URL is not set. History is lost on restart and "
                      "cannot be shared between workers.")
    print("\n".join(banner), file=sys.stderr, flush=True)
    # Before uvicorn spawns the workers: one empty metrics directory they all write to.
    prepare_supervisor(settings.web_concurrency)
    config = uvicorn.Config(
        "server.app:app", host=settings.host, port=settings.port, workers=settings.web_concurrency,
        loop="uvloop", http="server.http_protocol:HeadDeadlineProtocol",  # httptools + HEADER_TIMEOUT_SECONDS
        ws_per_message_deflate=settings.ws_compression, ws_max_size=settings.max_ws_frame_bytes,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_seconds) + 5,
        log_level=settings.log_level.lower(), proxy_headers=True,
        access_log=False)  # (ours: one JSON line per request, server/middleware.py)
    # What uvicorn.run does, but a worker that cannot start (Redis unreachable, a bad
    # certificate) ends the process with uvicorn's STARTUP_FAILURE (3) whatever the number of
    # workers: uvicorn.run exits 0 then when there are several, which a restart policy or a
    # deploy check takes for a clean stop.
    if settings.web_concurrency == 1:
        server = uvicorn.Server(config)
        with contextlib.suppress(KeyboardInterrupt):  # (Ctrl-C: a stop, as uvicorn.run takes it)
            server.run()
        return 0 if server.started else STARTUP_FAILURE
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    with contextlib.suppress(KeyboardInterrupt):
        supervisor.run()
    return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0


if __name__ == "__main__":
    sys.exit(main())
