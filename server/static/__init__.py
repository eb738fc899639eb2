"""The built-in chat page: `GET /` and its assets under `/static/` (plain files in `web/`,
no build step). It talks to `WS /agent/ws` and loads nothing from other origins."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response

WEB = Path(__file__).resolve().parent / "web"

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def chat_page(request: Request) -> Response:
    return FileResponse(WEB / "index.html", headers=PAGE_HEADERS)
