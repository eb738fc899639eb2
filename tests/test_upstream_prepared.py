"""The prepared Messages call (server/upstream.py `PreparedCall`) behaves exactly as the SDK's
`client.post` it replaces: the same request headers, the same retries before the first byte
(429/529/5xx, `retry-after`, `x-should-retry`, connection errors, timeouts) and the same typed
errors. Each scenario runs through both paths, against the fake on a real socket (or a raw server),
and the two runs are compared.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import anthropic
import pytest

from server.fake_anthropic import FakeAnthropic
from server.upstream import PreparedCall, UpstreamStream, encode_request
from server.upstream_transport import make_http_client

from .test_upstream_transport import MSG, raw_server

BODY = encode_request(MSG)
# The headers that differ between two calls whatever sends them.
VOLATILE = {"content-length"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    upstream = FakeAnthropic()
    await upstream.start()
    yield upstream
    await upstream.stop()


def client_for(url: str, max_retries: int = 2, timeout: float = 30.0) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="sk-test", base_url=url, max_retries=max_retries, timeout=timeout,
                                    http_client=make_http_client(timeout=timeout))


async def outcome(url: str, direct: bool, betas: str | None = None, **client: Any) -> tuple[Any, str]:
    """What one call ends with: ("ok", the streamed body) or (the error's class, status, request id,
    message), and which path sent it."""
    async with client_for(url, **client) as sdk:
        call = PreparedCall(sdk)
        assert call.direct  # (a plain API-key client: the prepared path applies)
        call.direct = direct
        try:
            response = await call.send(BODY, betas)
        except anthropic.APIStatusError as exc:
            rid = exc.request_id or ""  # (the fake's, a new one per request: compared apart)
            body = {k: v for k, v in exc.body.items() if k != "request_id"} if isinstance(exc.body, dict) else exc.body
            return (type(exc).__name__, exc.status_code, rid, exc.message.replace(rid, "<id>"), body), "error"
        except anthropic.APIError as exc:
            return (type(exc).__name__, exc.message), "error"
        stream = UpstreamStream(response, 0.0)
        try:
            return [e if isinstance(e, dict) else e.text async for e in stream.events()], "ok"
        finally:
            await stream.aclose()


def attempts(fake: FakeAnthropic, since: int) -> list[tuple[int, int, dict[str, str]]]:
    """(status, retry count, headers less the volatile ones) of each request the fake received."""
    return [(r.status, r.retry_count, {k: v for k, v in r.headers.items() if k not in VOLATILE})
            for r in fake.requests[since:]]


def strip_ids(events: Any) -> Any:
    """A streamed answer with the fake's per-request ids left out (they differ between two calls)."""
    if isinstance(events, list):
        return [{**e, "message": {k: v for k, v in e["message"].items() if k != "id"}}
                if isinstance(e, dict) and e.get("type") == "message_start" else e for e in events]
    return events


SCENARIOS = {
    "overloaded twice, then an answer": [{"status": 529, "retry_after_ms": 1, "times": 2}, {"text": "third"}],
    "rate limited past the retries": [{"status": 429, "retry_after_ms": 1, "times": 3}],
    "a 500 the server says not to retry": [{"status": 500, "should_retry": False}],
    "a 400 is not retried": [{"status": 400, "message": "bad"}],
    "a 409 is retried": [{"status": 409}, {"text": "after conflict"}],
    "a 503 the server says to retry": [{"status": 503, "should_retry": True, "retry_after": 0}, {"text": "ok"}],
    "a 401": [{"status": 401}],
}


@pytest.mark.parametrize("name", SCENARIOS)
async def test_retries_and_errors_are_the_sdks(fake: FakeAnthropic, name: str) -> None:
    runs = []
    for direct in (False, True):  # the SDK's client.post, then the prepared call
        fake.script(*SCENARIOS[name])
        since = len(fake.requests)
        result, how = await outcome(fake.base_url, direct)
        if how == "error" and len(result) == 5:  # the error's request id is the last attempt's
            assert result[2] == fake.requests[-1].request_id
            result = result[:2] + result[3:]
        runs.append((strip_ids(result) if how == "ok" else result, how, attempts(fake, since)))
    (sdk_result, sdk_how, sdk_attempts), (ours, our_how, our_attempts) = runs
    assert (our_how, ours) == (sdk_how, sdk_result)
    assert [(s, n) for s, n, _ in our_attempts] == [(s, n) for s, n, _ in sdk_attempts]
    assert [h for _, _, h in our_attempts] == [h for _, _, h in sdk_attempts], "the same headers, attempt by attempt"
    assert len(our_attempts) >= 1


async def test_the_request_id_of_an_error_is_the_failed_attempts(fake: FakeAnthropic) -> None:
    fake.script({"status": 400, "message": "bad"})
    result, _ = await outcome(fake.base_url, True)
    assert result[0] == "BadRequestError" and result[2] == fake.requests[-1].request_id


async def test_the_beta_header_goes_with_every_attempt(fake: FakeAnthropic) -> None:
    for direct in (False, True):
        fake.script({"status": 529, "retry_after_ms": 1}, {"text": "ok"})
        since = len(fake.requests)
        await outcome(fake.base_url, direct, betas="interleaved-thinking-2025-05-14")
        assert [r.headers.get("anthropic-beta") for r in fake.requests[since:]] == \
            ["interleaved-thinking-2025-05-14"] * 2


async def test_connection_refused_is_retried_then_a_connection_error() -> None:
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        results = [await outcome(url, direct, max_retries=1) for direct in (False, True)]
    assert results[0] == results[1] and results[1][0][0] == "APIConnectionError"


async def test_a_silent_server_times_out_each_attempt_then_a_timeout_error() -> None:
    accepted = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await reader.read()  # never answers
        writer.close()

    async with raw_server(silent) as url:
        results = []
        for direct in (False, True):
            before = len(accepted)
            results.append((await outcome(url, direct, max_retries=1, timeout=0.3), len(accepted) - before))
    assert results[0] == results[1]
    (error, how), tries = results[1]
    assert (error[0], how, tries) == ("APITimeoutError", "error", 2)


async def test_a_client_the_sdk_must_prepare_per_call_goes_through_client_post(fake: FakeAnthropic) -> None:
    """SDK middleware (or credentials it refreshes, custom auth, idempotency keys) may change each request:
    such a client is not sent the prepared way."""
    async with client_for(fake.base_url) as sdk:
        assert PreparedCall(sdk).direct
        sdk._middleware = (lambda request, call_next: call_next(request),)  # type: ignore[attr-defined]
        assert not PreparedCall(sdk).direct
    async with client_for(fake.base_url) as sdk:
        sdk._idempotency_header = "Idempotency-Key"
        assert not PreparedCall(sdk).direct
