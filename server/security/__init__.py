"""Security: who may call (keys.py: API keys, WebSocket tickets), how much (limits.py: rate
limits, stream slots) and the gate applying both, CORS and origins (guard.py). Log redaction: server/logs.py.
"""

from .guard import AllowlistCORS, Guard, SecurityMiddleware, admit_turn, cors_options, opens_stream, public, starts_turn
from .keys import principal_of

__all__ = ["AllowlistCORS", "Guard", "SecurityMiddleware", "admit_turn", "cors_options", "opens_stream",
           "principal_of", "public", "starts_turn"]
