"""Exception handlers: every failure leaves as JSON with a stable code, never as HTML."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from redis.exceptions import RedisError

from ..errors import ApiError, error_response, from_exception, store_unavailable

log = logging.getLogger("server.errors")

_STATUS_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


async def api_error(request: Request, exc: Exception) -> Response:
    """Ours as it is; Redis not answering a retryable 503 (handled here: no traceback per request)."""
    return error_response(from_exception(exc))


async def http_error(request: Request, exc: Exception) -> Response:
    code = _STATUS_CODES.get(exc.status_code)
    if code is None:
        return JSONResponse({"error": {"code": "http_error", "message": str(exc.detail), "retryable": False}},
                            status_code=exc.status_code, headers=exc.headers)
    return error_response(ApiError(code))


def internal_error(exc: BaseException) -> ApiError:
    """The error for an exception nothing mapped (the caller logs it): the store not answering
    stays `store_unavailable`; anything else is `internal`, retryable only for I/O (OSError): a
    TypeError, RecursionError... is a bug the same request hits again, so it must not invite a retry."""
    if isinstance(exc, ApiError) or store_unavailable(exc):
        return from_exception(exc)
    error = ApiError("internal")
    error.retryable = isinstance(exc, OSError)
    return error


async def unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(internal_error(exc))


EXCEPTION_HANDLERS = {ApiError: api_error, HTTPException: http_error, RedisError: api_error, Exception: unexpected}
