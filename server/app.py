"""The ASGI app: every route with its security policy, the middleware and the lifespan, on one screen.

Run it with `scripts/run` (development) or `uvicorn server.app:app` (Procfile). One
AsyncAnthropic client and one store (Redis pool) per worker process, closed at shutdown.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from dotenv import load_dotenv
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from . import lifecycle, logs, metrics, openapi, static
from .config import ConfigError, Settings
from .security import AllowlistCORS, Guard, SecurityMiddleware, cors_options, opens_stream, public, starts_turn
from .transports.http_api import (agent, cancel_session, delete_session, get_session, health, list_sessions, ready,
                                  rename_session, tool_approval, tool_result)
from .transports.sse import agent_stream, resume_stream
from .transports.websocket import agent_ws
from .transports.ai_sdk import chat, chat_resume
from .transports.ai_sdk_ws import chat_ws
from .transports.errors import EXCEPTION_HANDLERS
from .middleware import RequestContext


def create_app(settings: Settings | None = None) -> Starlette:
    if settings is None:
        load_dotenv()
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
    logs.configure(settings.log_level)
    guard = Guard(settings)  # auth, origins, rate limits, stream slots (server/security/)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with lifecycle.components(settings) as engine, guard.attached(engine):
            app.state.engine = engine
            yield

    # Unmarked routes need a key (or a loopback client without keys) and count as requests;
    # `starts_turn` also needs tokens left this minute, `opens_stream` holds a stream slot.
    routes = [
        starts_turn(Route("/agent", agent, methods=["POST"])),
        starts_turn(opens_stream(Route("/agent/stream", agent_stream, methods=["POST"]))),
        opens_stream(WebSocketRoute("/agent/ws", agent_ws)),
        Route("/sessions", list_sessions, methods=["GET"]),  # the caller's conversations, newest first
        Route("/sessions/{session_id}", get_session, methods=["GET"]),
        Route("/sessions/{session_id}", rename_session, methods=["PATCH"]),
        Route("/sessions/{session_id}", delete_session, methods=["DELETE"]),
        opens_stream(Route("/sessions/{session_id}/stream", resume_stream, methods=["GET"])),
        Route("/sessions/{session_id}/cancel", cancel_session, methods=["POST"]),
        Route("/sessions/{session_id}/tool-approvals", tool_approval, methods=["POST"]),  # human in the loop
        Route("/sessions/{session_id}/tool-results", tool_result, methods=["POST"]),      # client tools
        Route("/ws-ticket", guard.ws_ticket, methods=["POST"]),
        # Vercel AI SDK `useChat` (UI message stream protocol v1; WebSocketChatTransport)
        starts_turn(opens_stream(Route("/api/chat", chat, methods=["POST"]))),
        opens_stream(WebSocketRoute("/api/chat/ws", chat_ws)),
        opens_stream(Route("/api/chat/{chat_id}/stream", chat_resume, methods=["GET"])),
        public(Route("/health", health, methods=["GET"])),
        public(Route("/ready", ready, methods=["GET"])),
        # The built-in chat page, Prometheus metrics and the OpenAPI description
        public(Route("/", static.chat_page, methods=["GET"])),
        public(Mount("/static", app=StaticFiles(directory=static.WEB), name="static")),  # its script and stylesheet
        Route("/metrics", metrics.metrics_endpoint, methods=["GET"]),
        public(Route("/openapi.json", openapi.openapi_endpoint, methods=["GET"])),
    ]
    middleware = [
        Middleware(AllowlistCORS, **cors_options(settings)),  # outermost: errors carry CORS headers too
        Middleware(SecurityMiddleware, guard=guard),          # each route's policy, marked above
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers=EXCEPTION_HANDLERS)
    app.add_middleware(RequestContext)  # outermost: X-Request-ID and metrics on every response
    app.state.settings = settings
    app.state.guard = guard
    return app


app = create_app()
