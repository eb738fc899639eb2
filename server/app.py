"""The ASGI app: every route, the middleware and the lifespan, on one screen.

Run it with `scripts/run` (development) or `uvicorn server.app:app` (Procfile). One
AsyncAnthropic client and one store (Redis pool) per worker process, closed at shutdown.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from dotenv import load_dotenv
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

from . import lifecycle, logs
from .config import ConfigError, Settings
from .transports.http_api import agent, cancel_session, delete_session, get_session, health, ready
from .transports.sse import agent_stream, resume_stream
from .transports.websocket import agent_ws
from .transports.errors import EXCEPTION_HANDLERS

log = logging.getLogger("server.app")


def create_app(settings: Settings | None = None) -> Starlette:
    if settings is None:
        load_dotenv()
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
    logs.configure(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with lifecycle.components(settings) as engine:
            app.state.settings = settings
            app.state.engine = engine
            yield

    routes = [
        Route("/agent", agent, methods=["POST"]),
        Route("/agent/stream", agent_stream, methods=["POST"]),
        WebSocketRoute("/agent/ws", agent_ws),
        Route("/sessions/{session_id}", get_session, methods=["GET"]),
        Route("/sessions/{session_id}", delete_session, methods=["DELETE"]),
        Route("/sessions/{session_id}/stream", resume_stream, methods=["GET"]),
        Route("/sessions/{session_id}/cancel", cancel_session, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.settings = settings
    return app


app = create_app()
