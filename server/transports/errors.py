"""Exception handlers: every failure leaves as JSON with a stable code, never as HTML."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import ApiError
from .http_api import error_response

log = logging.getLogger("server.errors")

_STATUS_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code)
    if code is None:
        return JSONResponse({"error": {"code": "http_error", "message": str(exc.detail), "retryable": False}},
                            status_code=exc.status_code, headers=exc.headers)
    return error_response(ApiError(code))


async def unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError("internal"))


EXCEPTION_HANDLERS = {ApiError: api_error, HTTPException: http_error, Exception: unexpected}
