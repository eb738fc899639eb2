"""Who is calling: the principal that owns sessions and is rate limited."""

from __future__ import annotations

from starlette.requests import HTTPConnection

ANONYMOUS = "anonymous"
SCOPE_KEY = "agent.principal"


def principal_of(conn: HTTPConnection) -> str:
    return conn.scope.get(SCOPE_KEY) or ANONYMOUS
