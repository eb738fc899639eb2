"""A fake Anthropic Messages API on a real TCP socket.

Used by tests (scripted answers, failure injection, request recording), by the
benchmark (cheap paced streams) and by the app's offline mode (a deterministic
default model when no ANTHROPIC_API_KEY is set). It speaks the wire format the
real SDK expects, so the app's own ``AsyncAnthropic`` client is exercised end
to end.

    fake = FakeAnthropic()
    url = await fake.start()
    fake.script({"text": "Hello there"}, {"status": 529, "times": 2})
    client = anthropic.AsyncAnthropic(api_key="test", base_url=url)
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from .http import HttpConnection, HttpRequest, HttpServer
from .model import (
    DEFAULT_ERROR_MESSAGES,
    Plan,
    PromptCache,
    Segment,
    build_stream,
    content_text,
    count_deltas,
    count_input_tokens,
    default_plan,
    dumps,
    error_body,
    error_headers,
    error_type_for,
    find_directive,
    last_user_content,
    message_json,
    plan_from_spec,
)

__all__ = ["FakeAnthropic", "RecordedRequest"]

log = logging.getLogger("fake_anthropic")

_REDACTED = "<redacted>"
_SECRET_HEADERS = ("authorization", "x-api-key")

Headers = list[tuple[str, str]]


@dataclass
class RecordedRequest:
    """What the fake saw and did for one /v1/* request (never holds credentials)."""

    method: str
    path: str
    headers: dict[str, str]
    auth: str | None
    body: Any
    stream: bool = False
    status: int = 0
    events_sent: int = 0
    closed_early: bool = False
    finished: bool = False
    retry_count: int = 0
    source: str | None = None  # "script" | "directive" | "default" for /v1/messages answers
    request_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _json(obj: Any) -> bytes:
    return dumps(obj).encode()


class FakeAnthropic:
    """The fake server. ``script()`` queues answers; otherwise directives or the offline model answer."""

    def __init__(self, *, pace_ms: float = 0, api_key: str | None = None, max_recorded: int = 10_000) -> None:
        self.pace_ms = float(pace_ms)
        self.api_key = api_key
        self.max_recorded = max_recorded
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._cache = PromptCache()
        self._http = HttpServer(self._handle)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return the base URL."""
        host, port = await self._http.start(host, port)
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{port}"
        return self.base_url

    async def stop(self) -> None:
        await self._http.stop()

    def script(self, *scripts: dict[str, Any]) -> None:
        """Append answers to the FIFO queue; ``{"times": n}`` serves n requests."""
        for spec in scripts:
            if not isinstance(spec, dict):
                raise TypeError("a script must be a dict")
            times = spec.get("times", 1)
            self._queue.extend([spec] * (times if isinstance(times, int) and times > 0 else 1))

    def reset(self) -> None:
        """Clear the script queue, the recorded requests and the prompt-cache memory."""
        self._queue.clear()
        self.requests.clear()
        self._cache.clear()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _handle(self, req: HttpRequest, conn: HttpConnection) -> None:
        request_id = f"req_{secrets.token_hex(12)}"
        base_headers = [("request-id", request_id), ("server", "fake-anthropic")]
        if req.path.startswith("/_fake/"):
            await self._control(req, conn, base_headers)
            return
        rec = self._record(req, request_id)
        try:
            await self._api(req, conn, rec, base_headers)
        except Exception as exc:  # a bug here must not hang the client
            if rec.status == 0:
                await self._error(conn, rec, base_headers, 500, "api_error", f"fake-anthropic internal error: {exc!r}")
            else:
                conn.abort()
            log.exception("fake-anthropic: error while answering %s %s", req.method, req.path)

    async def _control(self, req: HttpRequest, conn: HttpConnection, headers: Headers) -> None:
        """Unauthenticated test hooks, so a test in another process can script the fake."""
        route = (req.method, req.path.rstrip("/"))
        if route == ("POST", "/_fake/script"):
            try:
                payload = json.loads(req.body or b"null")
                self.script(*(payload if isinstance(payload, list) else [payload]))
            except (ValueError, TypeError) as exc:
                body = error_body("invalid_request_error", f"script must be a JSON object or list: {exc}", None)
                await conn.send(400, headers, _json(body))
                return
            await conn.send(200, headers, _json({"queued": self.queued}))
        elif route == ("GET", "/_fake/requests"):
            await conn.send(200, headers, _json([r.to_json() for r in self.requests]))
        elif route == ("POST", "/_fake/reset"):
            self.reset()
            await conn.send(200, headers, b'{"ok":true}')
        else:
            body = error_body("not_found_error", f"Not found: {req.method} {req.path}", None)
            await conn.send(404, headers, _json(body))

    def _record(self, req: HttpRequest, request_id: str) -> RecordedRequest:
        headers = {k: (_REDACTED if k in _SECRET_HEADERS else v) for k, v in req.headers.items()}
        auth: str | None = None
        if req.headers.get("authorization", "").lower().startswith("bearer "):
            auth = "bearer"
        elif req.headers.get("x-api-key"):
            auth = "x-api-key"
        try:
            retry_count = int(req.headers.get("x-stainless-retry-count", "0"))
        except ValueError:
            retry_count = 0
        body = None
        if req.body:
            try:
                body = json.loads(req.body)
            except ValueError:
                pass
        rec = RecordedRequest(method=req.method, path=req.path, headers=headers, auth=auth, body=body,
                              stream=isinstance(body, dict) and body.get("stream") is True,
                              retry_count=retry_count, request_id=request_id)
        self.requests.append(rec)
        if self.max_recorded and len(self.requests) > self.max_recorded:
            del self.requests[: len(self.requests) - self.max_recorded]
        return rec

    async def _error(self, conn: HttpConnection, rec: RecordedRequest, headers: Headers,
                     status: int, etype: str, message: str) -> None:
        rec.status = status
        await conn.send(status, headers, _json(error_body(etype, message, rec.request_id)))
        rec.finished = True

    async def _api(self, req: HttpRequest, conn: HttpConnection, rec: RecordedRequest, headers: Headers) -> None:
        refusal = _refusal(req, rec, self.api_key)
        if refusal:
            await self._error(conn, rec, headers, *refusal)
            return
        body = rec.body
        assert isinstance(body, dict)
        if req.path.endswith("count_tokens"):
            rec.status = 200
            await conn.send(200, headers, _json({"input_tokens": count_input_tokens(body)}))
            rec.finished = True
            return

        if self._queue:
            plan = plan_from_spec(self._queue.popleft(), source="script", default_pace_ms=self.pace_ms)
        elif (directive := find_directive(content_text(last_user_content(body)))) is not None:
            plan = plan_from_spec(directive, source="directive", default_pace_ms=self.pace_ms)
        else:
            plan = default_plan(body, pace_ms=self.pace_ms)
        rec.source = plan.source

        if plan.status != 200:
            etype = plan.error_type or error_type_for(plan.status)
            message = plan.message or DEFAULT_ERROR_MESSAGES.get(etype, f"Error {plan.status}")
            await conn.sleep(plan.ttft_s)
            await self._error(conn, rec, headers + error_headers(plan), plan.status, etype, message)
            return
        usage = self._cache.usage(body)
        if rec.stream:
            await self._stream(conn, rec, headers, *build_stream(plan, model=body["model"], usage=usage))
        else:
            await self._non_stream(conn, rec, headers, plan, message_json(plan, model=body["model"], usage=usage))

    async def _non_stream(self, conn: HttpConnection, rec: RecordedRequest, headers: Headers, plan: Plan,
                          message: dict[str, Any]) -> None:
        """The whole message after ttft + pace per delta; drop/error_after become a drop / an HTTP error."""
        await conn.sleep(plan.ttft_s + plan.pace_s * count_deltas(plan))
        if conn.gone:
            rec.closed_early = True
            return
        if plan.drop_after is not None:
            conn.abort()
            return
        if plan.error_after is not None:
            etype, msg = plan.cut_error()
            await self._error(conn, rec, headers, 529 if etype == "overloaded_error" else 500, etype, msg)
            return
        rec.status = 200
        ok = await conn.send(200, headers, _json(message))
        rec.finished = ok
        rec.closed_early = not ok

    async def _stream(self, conn: HttpConnection, rec: RecordedRequest, headers: Headers,
                      segments: list[Segment], outcome: str) -> None:
        """Write the pre-encoded SSE segments, noticing a client hang-up between writes."""
        rec.status = 200
        if not await conn.start_chunked(200, headers + [("cache-control", "no-cache")], "text/event-stream; charset=utf-8"):
            rec.closed_early = True
            return
        last = len(segments) - 1
        for i, (delay, data, events) in enumerate(segments):
            if delay > 0:
                await conn.sleep(delay)
            if i == last and outcome != "drop":
                ok = await conn.end_chunked(data)
            else:
                ok = await conn.write(data)
            if not ok:
                rec.closed_early = True
                return
            rec.events_sent += events
        if outcome == "drop":
            conn.abort()
            return
        rec.finished = True


def _refusal(req: HttpRequest, rec: RecordedRequest, api_key: str | None) -> tuple[int, str, str] | None:
    """Why the API refuses a request: (status, error type, message); None if it does not."""
    if req.path not in ("/v1/messages", "/v1/messages/count_tokens"):
        return 404, "not_found_error", f"Not found: {req.method} {req.path}"
    if req.method != "POST":
        return 405, "invalid_request_error", f"Method {req.method} not allowed"
    authz = req.headers.get("authorization", "")
    key = authz[7:].strip() if authz.lower().startswith("bearer ") else req.headers.get("x-api-key", "")
    if not key or (api_key is not None and key != api_key):
        return 401, "authentication_error", "x-api-key header is required" if rec.auth is None else "invalid x-api-key"
    problem = _invalid_body(rec.body, count_only=req.path.endswith("count_tokens"))
    return None if problem is None else (400, "invalid_request_error", problem)


def _invalid_body(body: Any, *, count_only: bool) -> str | None:
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    mt = body.get("max_tokens")
    if not count_only and (not isinstance(mt, int) or isinstance(mt, bool) or mt <= 0):
        return "max_tokens: must be a positive integer"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages: must be a non-empty list"
    return None
