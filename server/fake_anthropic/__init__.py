"""A fake Anthropic Messages API on a real TCP socket.

Used by tests (scripted answers, failure injection, request recording), by
benchmarks (cheap paced streams) and by the app's offline mode (a deterministic
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
    build_stream,
    count_deltas,
    count_input_tokens,
    default_plan,
    error_body,
    error_headers,
    error_type_for,
    find_directive,
    last_user_message,
    message_json,
    message_text,
    plan_from_spec,
)

__all__ = ["FakeAnthropic", "RecordedRequest"]

log = logging.getLogger("fake_anthropic")

_REDACTED = "<redacted>"
_SECRET_HEADERS = ("authorization", "x-api-key")


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


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class _Queued:
    spec: dict[str, Any]
    remaining: int


class FakeAnthropic:
    """The fake server. ``script()`` queues answers; otherwise directives or the offline model answer."""

    def __init__(self, *, pace_ms: float = 0, api_key: str | None = None, max_recorded: int = 10_000) -> None:
        self.pace_ms = float(pace_ms)
        self.api_key = api_key
        self.max_recorded = max_recorded
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self._queue: collections.deque[_Queued] = collections.deque()
        self._cache = PromptCache()
        self._http = HttpServer(self._handle)

    # -- lifecycle -------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return the base URL."""
        host, port = await self._http.start(host, port)
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{port}"
        return self.base_url

    async def stop(self) -> None:
        await self._http.stop()

    async def __aenter__(self) -> FakeAnthropic:
        if not self.base_url:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- control -----------------------------------------------------------------
    def script(self, *scripts: dict[str, Any]) -> None:
        """Append answers to the FIFO queue; ``{"times": n}`` serves n requests."""
        for spec in scripts:
            if not isinstance(spec, dict):
                raise TypeError("a script must be a dict")
            times = spec.get("times", 1)
            self._queue.append(_Queued(spec, int(times) if isinstance(times, int) and times > 0 else 1))

    def reset(self) -> None:
        """Clear the script queue, the recorded requests and the prompt-cache memory."""
        self._queue.clear()
        self.requests.clear()
        self._cache.clear()

    @property
    def queued(self) -> int:
        return sum(q.remaining for q in self._queue)

    def _next_script(self) -> dict[str, Any] | None:
        if not self._queue:
            return None
        head = self._queue[0]
        head.remaining -= 1
        if head.remaining <= 0:
            self._queue.popleft()
        return head.spec

    # -- HTTP ----------------------------------------------------------------------
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
                rec.status = 500
                body = error_body("api_error", f"fake-anthropic internal error: {exc!r}", request_id)
                await conn.send(500, base_headers, _json_bytes(body))
                rec.finished = True
            else:
                conn.abort()
            log.exception("fake-anthropic: error while answering %s %s", req.method, req.path)

    async def _control(self, req: HttpRequest, conn: HttpConnection, headers: list[tuple[str, str]]) -> None:
        """Unauthenticated test hooks, so a test in another process can script the fake."""
        route = (req.method, req.path.rstrip("/"))
        if route == ("POST", "/_fake/script"):
            try:
                payload = json.loads(req.body or b"null")
                specs = payload if isinstance(payload, list) else [payload]
                self.script(*specs)
            except (ValueError, TypeError) as exc:
                body = error_body("invalid_request_error", f"script must be a JSON object or list: {exc}", None)
                await conn.send(400, headers, _json_bytes(body))
                return
            await conn.send(200, headers, _json_bytes({"queued": self.queued}))
        elif route == ("GET", "/_fake/requests"):
            await conn.send(200, headers, _json_bytes([r.to_json() for r in self.requests]))
        elif route == ("POST", "/_fake/reset"):
            self.reset()
            await conn.send(200, headers, b'{"ok":true}')
        else:
            body = error_body("not_found_error", f"Not found: {req.method} {req.path}", None)
            await conn.send(404, headers, _json_bytes(body))

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
        rec = RecordedRequest(
            method=req.method, path=req.path, headers=headers, auth=auth, body=None,
            retry_count=retry_count, request_id=request_id,
        )
        if req.body:
            try:
                rec.body = json.loads(req.body)
            except ValueError:
                rec.body = None
        rec.stream = isinstance(rec.body, dict) and rec.body.get("stream") is True
        self.requests.append(rec)
        if self.max_recorded and len(self.requests) > self.max_recorded:
            del self.requests[: len(self.requests) - self.max_recorded]
        return rec

    def _key_ok(self, req: HttpRequest) -> bool:
        authz = req.headers.get("authorization", "")
        key = authz[7:].strip() if authz.lower().startswith("bearer ") else req.headers.get("x-api-key", "")
        if not key:
            return False
        return self.api_key is None or key == self.api_key

    async def _error(
        self, conn: HttpConnection, rec: RecordedRequest, headers: list[tuple[str, str]],
        status: int, etype: str, message: str,
    ) -> None:
        rec.status = status
        await conn.send(status, headers, _json_bytes(error_body(etype, message, rec.request_id)))
        rec.finished = True

    async def _api(
        self, req: HttpRequest, conn: HttpConnection, rec: RecordedRequest, headers: list[tuple[str, str]]
    ) -> None:
        if req.path not in ("/v1/messages", "/v1/messages/count_tokens"):
            await self._error(conn, rec, headers, 404, "not_found_error", f"Not found: {req.method} {req.path}")
            return
        if req.method != "POST":
            await self._error(conn, rec, headers, 405, "invalid_request_error", f"Method {req.method} not allowed")
            return
        if not self._key_ok(req):
            msg = "x-api-key header is required" if rec.auth is None else "invalid x-api-key"
            await self._error(conn, rec, headers, 401, "authentication_error", msg)
            return
        body = rec.body
        problem = _validate(body, count_only=req.path.endswith("count_tokens"))
        if problem:
            await self._error(conn, rec, headers, 400, "invalid_request_error", problem)
            return
        assert isinstance(body, dict)
        if req.path.endswith("count_tokens"):
            rec.status = 200
            await conn.send(200, headers, _json_bytes({"input_tokens": count_input_tokens(body)}))
            rec.finished = True
            return

        spec = self._next_script()
        if spec is not None:
            plan = plan_from_spec(spec, source="script", default_pace_ms=self.pace_ms)
        else:
            directive = find_directive(message_text(last_user_message(body)))
            if directive is not None:
                plan = plan_from_spec(directive, source="directive", default_pace_ms=self.pace_ms)
            else:
                plan = default_plan(body, pace_ms=self.pace_ms)
        rec.source = plan.source

        if plan.status != 200:
            etype = plan.error_type or error_type_for(plan.status)
            await conn.sleep(plan.ttft_s)
            await self._error(
                conn, rec, headers + error_headers(plan), plan.status, etype,
                plan.message or DEFAULT_ERROR_MESSAGES.get(etype, f"Error {plan.status}"),
            )
            return

        usage = self._cache.usage(body)
        model = str(body["model"])
        if rec.stream:
            await self._stream(conn, rec, headers, plan, model, usage)
        else:
            await self._non_stream(conn, rec, headers, plan, model, usage)

    async def _non_stream(
        self, conn: HttpConnection, rec: RecordedRequest, headers: list[tuple[str, str]],
        plan: Plan, model: str, usage: dict[str, int],
    ) -> None:
        """A whole message after ttft + pace per delta; drop/error_after become a drop / an HTTP error."""
        await conn.sleep(plan.ttft_s + plan.pace_s * count_deltas(plan))
        if conn.gone:
            rec.closed_early = True
            return
        if plan.drop_after is not None:
            conn.abort()
            return
        if plan.error_after is not None:
            etype = plan.error_type or "overloaded_error"
            status = 529 if etype == "overloaded_error" else 500
            await self._error(conn, rec, headers, status, etype, plan.message or "Overloaded")
            return
        rec.status = 200
        ok = await conn.send(200, headers, _json_bytes(message_json(plan, model=model, usage=usage)))
        rec.finished = ok
        rec.closed_early = not ok

    async def _stream(
        self, conn: HttpConnection, rec: RecordedRequest, headers: list[tuple[str, str]],
        plan: Plan, model: str, usage: dict[str, int],
    ) -> None:
        """Write the pre-encoded SSE segments, noticing a client hang-up between writes."""
        script = build_stream(plan, model=model, usage=usage)
        rec.status = 200
        if not await conn.start_chunked(200, headers + [("cache-control", "no-cache")], "text/event-stream; charset=utf-8"):
            rec.closed_early = True
            return
        segments = script.segments
        last = len(segments) - 1
        for i, seg in enumerate(segments):
            if seg.delay > 0:
                await conn.sleep(seg.delay)
            if i == last and script.outcome != "drop":
                ok = await conn.end_chunked(seg.data)
            else:
                ok = await conn.write(seg.data)
            if not ok:
                rec.closed_early = True
                return
            rec.events_sent += seg.events
        if script.outcome == "drop":
            conn.abort()
            return
        rec.finished = True


def _validate(body: Any, *, count_only: bool) -> str | None:
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
