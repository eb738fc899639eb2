"""Our error codes, and the one place that maps upstream (SDK) failures onto them.

Every error a client sees carries a stable `code`, a human `message` and `retryable`. Before
a response starts the code maps to an HTTP status; after, the same payload is an `error`
event. Upstream messages are never passed through: they can name our key's organisation,
internal ids or request details that are not the client's business.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anthropic
from redis import exceptions as redis_exceptions
from starlette.responses import JSONResponse

log = logging.getLogger("server.errors")

# code -> (HTTP status, retryable, default message)
ERRORS: dict[str, tuple[int, bool, str]] = {
    "invalid_json": (400, False, "The request body is not valid JSON."),
    "invalid_request": (400, False, "The request is invalid."),
    "invalid_session_id": (400, False, "The session id is malformed."),
    "model_not_allowed": (400, False, "That model is not allowed on this server."),
    "system_prompt_not_allowed": (400, False, "This server does not accept a client system prompt."),
    "invalid_image": (400, False, "An image is invalid."),
    "invalid_document": (400, False, "A document is invalid."),
    "invalid_thinking": (400, False, "The `thinking` or `effort` setting is invalid."),
    "thinking_not_allowed": (400, False, "This server does not accept `thinking` or `effort` from clients."),
    "thinking_not_supported": (400, False, "The model does not support that thinking type or effort level."),
    "unauthorized": (401, False, "A valid API key is required."),
    "budget_exceeded": (403, False, "The session's token budget is spent."),
    "forbidden_origin": (403, False, "This origin is not allowed."),
    "session_not_found": (404, False, "No such session."),
    "not_found": (404, False, "Not found."),
    "method_not_allowed": (405, False, "Method not allowed."),
    "request_timeout": (408, True, "The request did not arrive in time."),
    "session_busy": (409, True, "A turn is already running on this session."),
    "tool_call_not_pending": (409, False, "No running turn waits for an answer to that tool call."),
    "turn_not_found": (404, False, "No such turn in this session's history (`replace_turn`)."),
    "nothing_to_regenerate": (409, False, "That turn left no message to send again (it failed before answering): "
                                          "send its message again instead."),
    "body_too_large": (413, False, "The request body is too large."),
    "message_too_long": (413, False, "The message is too long."),
    "image_too_large": (413, False, "An image is too large."),
    "too_many_images": (413, False, "Too many images in one message."),
    "document_too_large": (413, False, "A document is too large."),
    "too_many_documents": (413, False, "Too many documents in one message."),
    "session_full": (413, False, "The session has reached its message limit; start a new session."),
    "rate_limited": (429, True, "Rate limited; retry after the indicated delay."),
    "internal": (500, True, "Internal error."),
    "upstream_unavailable": (502, True, "The model service is unreachable or failed."),
    "upstream_misconfigured": (502, False, "The server's model configuration was rejected upstream."),
    "upstream_overloaded": (503, True, "The model service is overloaded."),
    "overloaded": (503, True, "The server is at capacity."),
    "server_restarting": (503, True, "The server is restarting; retry shortly."),
    "store_unavailable": (503, True, "Session storage is unreachable; retry shortly."),
    "interrupted": (503, True, "The turn was interrupted (the worker running it stopped)."),
    "upstream_timeout": (504, True, "The model service timed out."),
    "bad_request": (400, False, "The model service rejected the request."),
    "context_too_long": (400, False, "The conversation is too long for the model's context window."),
    "max_iterations": (500, False, "The tool loop hit its iteration limit."),
    "structured_output_invalid": (502, True, "The model's answer did not match the requested schema."),
}


class ApiError(Exception):
    """An error with a stable code; raise it anywhere, transports render it."""

    def __init__(self, code: str, message: str | None = None, *, retry_after: float | None = None,
                 **extra: Any) -> None:
        self.status, self.retryable, default = ERRORS[code]
        self.code, self.message, self.retry_after, self.extra = code, message or default, retry_after, extra
        super().__init__(self.message)

    def payload(self) -> dict[str, Any]:  # for JSON bodies and `error` events
        body: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        body.update(self.extra)
        return body

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(max(1, int(self.retry_after + 0.999)))}


def error_response(exc: ApiError) -> JSONResponse:  # (before a response has started)
    headers = exc.headers()
    if exc.code == "unauthorized":
        headers["WWW-Authenticate"] = 'Bearer realm="agent"'
    return JSONResponse({"error": exc.payload()}, status_code=exc.status, headers=headers)


def status_of(code: str) -> int:
    return ERRORS[code][0]


def from_upstream(exc: BaseException) -> ApiError:
    """An SDK exception (or a mid-stream `error` event) as our error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, anthropic.APITimeoutError):
        return ApiError("upstream_timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return ApiError("upstream_unavailable", "The model service is unreachable.")
    if isinstance(exc, anthropic.APIStatusError):  # (its `type`, `api_message`: the body's error.type, error.message)
        message = exc.api_message if isinstance(exc.api_message, str) else ""
        return _from_status(exc.status_code, exc.type, message, _retry_after(exc), exc.request_id)
    if isinstance(exc, UpstreamStreamError):
        return _from_status(200, exc.error_type, exc.message, None, exc.request_id)
    log.exception("unexpected upstream failure", exc_info=exc)
    return ApiError("internal")


# Redis error replies that mean "not now" rather than "never": a restart, a failover, memory.
_store_warned_at = float("-inf")
_STORE_BUSY_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "OOM", "BUSY ")


def store_unavailable(exc: BaseException) -> bool:
    """Whether `exc` is the session store (Redis) failing to answer: retryable, never a 500."""
    # (a cluster: no node reachable, a slot without a master, redirects that outlasted our retries)
    return isinstance(exc, (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError,
                            redis_exceptions.RedisClusterException, redis_exceptions.ClusterError,
                            redis_exceptions.AskError, redis_exceptions.TryAgainError)) or \
        isinstance(exc, redis_exceptions.ResponseError) and str(exc).startswith(_STORE_BUSY_REPLIES)


def from_exception(exc: BaseException) -> ApiError:
    """Any failure outside the model call, as the client sees it: ours as it is, the store
    not answering as a retryable `store_unavailable`, anything else `internal` (logged here
    with its traceback, the only place an unexpected error is)."""
    if isinstance(exc, ApiError):
        return exc
    if store_unavailable(exc):
        global _store_warned_at
        now = time.monotonic()
        if now - _store_warned_at >= 30:  # one line per outage, not per request
            _store_warned_at = now
            log.warning("session store unavailable: %s: %s", type(exc).__name__, str(exc)[:200])
        return ApiError("store_unavailable")
    log.error("unexpected error", exc_info=exc)
    return ApiError("internal")


class UpstreamStreamError(Exception):
    """The upstream stream broke after it started: an `error` event or a cut connection."""

    def __init__(self, error_type: str, message: str, request_id: str | None = None):
        super().__init__(f"{error_type}: {message}")
        self.error_type, self.message, self.request_id = error_type, message, request_id


def _from_status(status: int, error_type: str | None, message: str, retry_after: float | None,
                 request_id: str | None) -> ApiError:
    extra = {"upstream_request_id": request_id} if request_id else {}
    if status == 429 or error_type == "rate_limit_error":
        return ApiError("rate_limited", "The model service is rate limiting this server.",
                        retry_after=retry_after, **extra)
    if status == 529 or error_type == "overloaded_error":
        return ApiError("upstream_overloaded", retry_after=retry_after, **extra)
    if status in (408, 504) or error_type == "timeout_error":
        return ApiError("upstream_timeout", **extra)
    if status in (401, 402, 403, 404) or error_type in ("authentication_error", "permission_error",
                                                        "not_found_error", "billing_error"):
        # Our key, plan or model name is wrong: not the client's fault, and not theirs to see.
        log.error("upstream rejected our configuration: status=%s type=%s", status, error_type)
        return ApiError("upstream_misconfigured", **extra)
    if status == 413 or error_type == "request_too_large":
        return ApiError("context_too_long", **extra)
    if status == 400 or error_type == "invalid_request_error":
        lowered = message.lower()
        if "prompt is too long" in lowered or "context" in lowered and "too long" in lowered:
            return ApiError("context_too_long", **extra)
        return ApiError("bad_request", **extra)
    # 5xx, api_error, a mid-stream failure (status 200) and anything unforeseen.
    return ApiError("upstream_unavailable", **extra)


def _retry_after(exc: anthropic.APIStatusError) -> float | None:
    headers = exc.response.headers if exc.response is not None else {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) * scale)
        except (KeyError, ValueError):
            continue
    return None
