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

It refuses what the API refuses in a request's shape (:mod:`.checks`), signs the thinking it
answers with (:mod:`.signing`) and answers ``GET /v1/models/{id}`` (:mod:`.catalog`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import unquote

from . import catalog, checks
from .http import READ_SIZE, HttpConnection, HttpRequest
from .model import build_stream, cache_usage, count_input_tokens, dumps, error_body, message_json, new_id, plan_for

__all__ = ["FakeAnthropic", "RecordedRequest"]

log = logging.getLogger("fake_anthropic")


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

    to_json = asdict


class FakeAnthropic:
    """The fake server. ``script()`` queues answers; otherwise directives or the offline model answer."""

    def __init__(self, *, pace_ms: float = 0, api_key: str | None = None, max_recorded: int = 10_000) -> None:
        self.base_url = ""
        self._server: asyncio.Server | None = None
        self._conns: dict[HttpConnection, asyncio.Task[None]] = {}
        self._stopping = False
        self.pace_ms = float(pace_ms)
        self.api_key = api_key
        self.max_recorded = max_recorded
        self.requests: list[RecordedRequest] = []
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._cache: set[str] = set()  # the prompt-cache simulation's written prefixes
        # models the fake knows besides the SDK's: id -> fields merged into its ModelInfo (see catalog)
        self.models: dict[str, dict[str, Any]] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return the base URL."""
        self._stopping = False
        self._server = await asyncio.start_server(self._serve, host, port, limit=READ_SIZE * 2, backlog=1024)
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{self._server.sockets[0].getsockname()[1]}"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening, drop open connections and wait for their handlers to finish.

        Aborted sockets end every handler within a write or a sleep; cancelling them first
        would make asyncio's start_server log spurious errors, so it is only the fallback.
        """
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        tasks = [t for t in self._conns.values() if t is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def script(self, *scripts: dict[str, Any]) -> None:
        """Append answers to the FIFO queue; ``{"times": n}`` serves n requests."""
        for spec in scripts:
            if not isinstance(spec, dict):
                raise TypeError("a script must be a dict")
            times = spec.get("times", 1)
            self._queue.extend([spec] * (times if isinstance(times, int) and times > 0 else 1))

    def reset(self) -> None:
        """Clear the script queue, the recorded requests, the prompt-cache memory and the added models."""
        self._queue.clear()
        self.requests.clear()
        self._cache.clear()
        self.models.clear()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = HttpConnection(reader, writer)
        self._conns[conn] = asyncio.current_task()  # type: ignore[assignment]
        try:
            while conn.keep_alive and (req := await conn.read_request()) is not None:
                await self._handle(req, conn)
            if conn.keep_alive and conn.error is not None:  # bytes that are not an HTTP/1.1 request
                conn.keep_alive = False
                body = {"type": "error", "error": {"type": "invalid_request_error", "message": conn.error}}
                await conn.send(400, [], json.dumps(body).encode())
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            del self._conns[conn]
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, req: HttpRequest, conn: HttpConnection) -> None:
        request_id = new_id("req_")
        headers = [("request-id", request_id), ("server", "fake-anthropic")]
        if req.path.startswith("/_fake/"):
            return await self._control(req, conn, headers)
        rec = self._record(req, request_id)
        try:
            await self._api(req, conn, rec, headers)
        except Exception as exc:  # a bug here must not hang the client
            if rec.status == 0:
                await self._send(conn, rec, headers, 500, "api_error", f"fake-anthropic internal error: {exc!r}")
            else:
                conn.abort()
            log.exception("fake-anthropic: error while answering %s %s", req.method, req.path)

    async def _control(self, req: HttpRequest, conn: HttpConnection, headers: list[tuple[str, str]]) -> None:
        """Unauthenticated test hooks, so a test in another process can script the fake."""
        route = (req.method, req.path.rstrip("/"))
        status, answer = 200, None
        if route == ("POST", "/_fake/script"):
            try:
                payload = json.loads(req.body or b"null")
                self.script(*(payload if isinstance(payload, list) else [payload]))
                answer = {"queued": self.queued}
            except (ValueError, TypeError) as exc:
                status = 400
                answer = error_body("invalid_request_error", f"script must be a JSON object or list: {exc}")
        elif route == ("POST", "/_fake/models"):  # {id: ModelInfo fields} to know or override
            try:
                payload = json.loads(req.body or b"null")
                if not isinstance(payload, dict) or not all(isinstance(v, dict) for v in payload.values()):
                    raise ValueError("expected {model id: {ModelInfo fields}}")
                self.models.update(payload)
                answer = {"models": sorted(self.models)}
            except ValueError as exc:
                status, answer = 400, error_body("invalid_request_error", f"models: {exc}")
        elif route == ("GET", "/_fake/requests"):
            answer = [r.to_json() for r in self.requests]
        elif route == ("POST", "/_fake/reset"):
            self.reset()
            answer = {"ok": True}
        else:
            status, answer = 404, error_body("not_found_error", f"Not found: {req.method} {req.path}")
        await conn.send(status, headers, dumps(answer).encode())

    def _record(self, req: HttpRequest, request_id: str) -> RecordedRequest:
        bearer = req.headers.get("authorization", "").lower().startswith("bearer ")
        auth = "bearer" if bearer else "x-api-key" if req.headers.get("x-api-key") else None
        body = None
        with contextlib.suppress(ValueError):
            body = json.loads(req.body) if req.body else None
        rec = RecordedRequest(req.method, req.path, {k: "<redacted>" if k in ("authorization", "x-api-key") else v
                                                     for k, v in req.headers.items()}, auth, body,
                              stream=isinstance(body, dict) and body.get("stream") is True, request_id=request_id)
        with contextlib.suppress(ValueError):
            rec.retry_count = int(req.headers.get("x-stainless-retry-count", "0"))
        self.requests.append(rec)
        if self.max_recorded and len(self.requests) > self.max_recorded:
            del self.requests[: len(self.requests) - self.max_recorded]
        return rec

    async def _send(self, conn: HttpConnection, rec: RecordedRequest, headers: list[tuple[str, str]], status: int,
                    *error: str, answer: Any = None) -> None:
        """A whole answer: ``answer``, or the error body of ``error`` (type, message)."""
        rec.status = status
        answer = answer if answer is not None else error_body(*error, rec.request_id)
        await conn.send(status, headers, dumps(answer).encode())
        rec.finished = True

    async def _api(self, req: HttpRequest, conn: HttpConnection, rec: RecordedRequest,
                   headers: list[tuple[str, str]]) -> None:
        refusal = _refusal(req, rec, self.api_key)
        if refusal:
            return await self._send(conn, rec, headers, *refusal)
        body = rec.body
        if req.path.startswith(MODELS_PATH):
            model_id = unquote(req.path[len(MODELS_PATH):])
            info = catalog.model_info(model_id, self.models)
            if info is None:
                return await self._send(conn, rec, headers, 404, "not_found_error", f"model: {model_id}")
            return await self._send(conn, rec, headers, 200, answer=info)
        if req.path.endswith("count_tokens"):
            return await self._send(conn, rec, headers, 200, answer={"input_tokens": count_input_tokens(body)})
        if problem := checks.problem(body, self.models, req.headers.get("anthropic-beta", "")):
            return await self._send(conn, rec, headers, 400, "invalid_request_error", problem)
        plan = plan_for(body, self._queue.popleft() if self._queue else None, self.pace_ms)
        rec.source = plan.source
        if plan.status != 200:
            await conn.sleep(plan.ttft_s)
            return await self._send(conn, rec, headers + plan.error_headers, plan.status, *plan.error)
        usage = cache_usage(self._cache, body)
        if rec.stream:
            # the head first (the SDK sees the answer start), then the pre-encoded SSE segments,
            # noticing a client hang-up between writes
            segments, drop = build_stream(plan, body["model"], usage)
            rec.status = 200
            head = conn.head(200, headers + [("cache-control", "no-cache")], "text/event-stream; charset=utf-8")
            for delay, data, events in [(0.0, head, 0), *segments]:
                if delay > 0:
                    await conn.sleep(delay)
                if not await conn.write(data):
                    rec.closed_early = True
                    return
                rec.events_sent += events
            if drop:
                conn.abort()
            rec.finished = not drop
            return
        # not streaming: the whole message after ttft + pace per delta; drop/error_after become a drop / an HTTP error
        message = message_json(plan, body["model"], usage)
        await conn.sleep(plan.ttft_s + plan.pace_s * plan.deltas)
        if conn.gone:
            rec.closed_early = True
        elif plan.drop_after is not None:
            conn.abort()
        elif plan.error_after is not None:
            await self._send(conn, rec, headers, 529 if plan.error[0] == "overloaded_error" else 500, *plan.error)
        else:
            rec.status = 200
            rec.finished = await conn.send(200, headers, dumps(message).encode())
            rec.closed_early = not rec.finished


MODELS_PATH = "/v1/models/"


def _refusal(req: HttpRequest, rec: RecordedRequest, api_key: str | None) -> tuple[int, str, str] | None:
    """Why the API refuses a request: (status, error type, message); None if it does not."""
    model_id = req.path[len(MODELS_PATH):] if req.path.startswith(MODELS_PATH) else ""
    models = bool(model_id) and "/" not in model_id
    if not models and req.path not in ("/v1/messages", "/v1/messages/count_tokens"):
        return 404, "not_found_error", f"Not found: {req.method} {req.path}"
    if req.method != ("GET" if models else "POST"):
        return 405, "invalid_request_error", f"Method {req.method} not allowed"
    key = req.headers["authorization"][7:].strip() if rec.auth == "bearer" else req.headers.get("x-api-key", "")
    if not key or (api_key is not None and key != api_key):
        return 401, "authentication_error", "x-api-key header is required" if rec.auth is None else "invalid x-api-key"
    if models:
        return None
    body, problem = rec.body, None
    if not isinstance(body, dict):
        problem = "request body must be a JSON object"
    elif not isinstance(body.get("model"), str) or not body["model"]:
        problem = "model: Field required"
    elif not req.path.endswith("count_tokens") and (not isinstance(mt := body.get("max_tokens"), int)
                                                   or isinstance(mt, bool) or mt <= 0):
        problem = "max_tokens: must be a positive integer"
    elif not isinstance(body.get("messages"), list) or not body["messages"]:
        problem = "messages: must be a non-empty list"
    return None if problem is None else (400, "invalid_request_error", problem)
