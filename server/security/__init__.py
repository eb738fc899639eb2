"""Security in one package: who may call, from which pages, how much, and what the logs say.

keys.py (API keys, WebSocket tickets, principals), origins.py (CORS and the Origin
allowlist), limits.py (rate limits and stream slots, in memory or Redis), redaction.py (log
filters), guard.py (the per-worker Guard, the ASGI middleware and the route policy marks).
"""

from .guard import (Guard, SecurityMiddleware, admit_turn, opens_stream, public, request_timeout,
                    starts_turn)
from .keys import principal_of
from .origins import AllowlistCORS, cors_options

__all__ = ["AllowlistCORS", "Guard", "SecurityMiddleware", "admit_turn", "cors_options", "opens_stream",
           "principal_of", "public", "request_timeout", "starts_turn"]
