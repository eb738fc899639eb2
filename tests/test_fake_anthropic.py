"""The fake Anthropic server, driven by the real SDK over a real socket.

These tests pin down the behaviour other tests and the offline mode rely on:
the wire format the SDK parses, failure injection (status errors, mid-stream
error events, dropped connections), request recording and cache accounting.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import anthropic
import httpx2
import pytest
import pytest_asyncio

from server.fake_anthropic import FakeAnthropic
from server.fake_anthropic.model import OFFLINE_PREFIX, find_directive, find_expression, split_words

ROOT = Path(__file__).resolve().parents[1]
MODEL = "claude-test"
USER_HI = [{"role": "user", "content": "hi"}]
CALCULATOR = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression",
    "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}}},
}


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def client(fake: FakeAnthropic, *, max_retries: int = 0, **kw: object) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="test", base_url=fake.base_url, max_retries=max_retries, **kw)  # type: ignore[arg-type]


async def wait_for(cond, timeout: float = 2.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return bool(cond())


# -- pure helpers ------------------------------------------------------------------


def test_split_words_and_directive_and_expression() -> None:
    text = "  Hello,  world!\nHow are\tyou? "
    assert "".join(split_words(text)) == text
    assert find_directive('go #fake{"text": "a}b{", "x": {"y": 1}} tail') == {"text": "a}b{", "x": {"y": 1}}
    assert find_directive("#fake{not json} then #fake{\"tokens\": 2}") == {"tokens": 2}
    assert find_directive("nothing here") is None
    assert find_expression("What is 12 * (3 + 4)?") == "12 * (3 + 4)"
    assert find_expression("(what is 2+3)") == "2+3"
    assert find_expression("I have 3 apples") is None


# -- streaming -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stream_text_concatenates_to_script(fake: FakeAnthropic) -> None:
    text = "Hello there, this is   a scripted answer.\nBye!"
    fake.script({"text": text})
    stream = await client(fake).messages.create(model=MODEL, max_tokens=50, messages=USER_HI, stream=True)
    types: list[str] = []
    deltas: list[str] = []
    async for event in stream:
        types.append(event.type)
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            deltas.append(event.delta.text)
        if event.type == "message_delta":
            assert event.delta.stop_reason == "end_turn"
            assert event.usage.output_tokens == len(deltas)
    assert "".join(deltas) == text
    assert len(deltas) > 3
    assert types[0] == "message_start" and types[-1] == "message_stop"
    rec = fake.requests[-1]
    assert (rec.stream, rec.status, rec.finished, rec.closed_early) == (True, 200, True, False)
    assert rec.auth == "bearer" and rec.headers["authorization"] == "<redacted>"
    assert "test" not in json.dumps(rec.to_json()["headers"])
    # message_start, ping, block start, deltas, block stop, message_delta, message_stop
    assert rec.events_sent == len(deltas) + 6
    assert rec.retry_count == 0 and rec.source == "script"


@pytest.mark.asyncio
async def test_stream_helper_tool_use_final_message(fake: FakeAnthropic) -> None:
    args = {"city": "Paris", "days": 3, "nested": {"units": ["C", "F"]}}
    fake.script({"text": "Let me check.", "tool_use": [{"name": "weather", "input": args, "id": "toolu_fixed"}]})
    async with client(fake).messages.stream(model=MODEL, max_tokens=50, messages=USER_HI) as stream:
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Let me check."  # type: ignore[union-attr]
    tool = message.content[1]
    assert tool.type == "tool_use" and tool.name == "weather" and tool.id == "toolu_fixed"
    assert tool.input == args


@pytest.mark.asyncio
async def test_tokens_script_and_pacing(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 5, "pace_ms": 20, "ttft_ms": 50})
    started = time.monotonic()
    resp = await client(fake).messages.create(model=MODEL, max_tokens=50, messages=USER_HI)
    assert resp.content[0].text == "tok0 tok1 tok2 tok3 tok4"  # type: ignore[union-attr]
    assert time.monotonic() - started >= 0.14


# -- failures ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_529_retried_then_success(fake: FakeAnthropic) -> None:
    # retry_after=0 is ignored by the SDK (it needs > 0) so it backs off ~0.5 s then ~1 s.
    fake.script({"status": 529, "retry_after": 0, "times": 2}, {"text": "finally"})
    resp = await client(fake, max_retries=2).messages.create(model=MODEL, max_tokens=10, messages=USER_HI)
    assert resp.content[0].text == "finally"  # type: ignore[union-attr]
    assert [r.retry_count for r in fake.requests] == [0, 1, 2]
    assert [r.status for r in fake.requests] == [529, 529, 200]


@pytest.mark.asyncio
async def test_429_not_retried_exposes_retry_after(fake: FakeAnthropic) -> None:
    fake.script({"status": 429, "retry_after": 7, "message": "slow down"})
    with pytest.raises(anthropic.RateLimitError) as info:
        await client(fake).messages.create(model=MODEL, max_tokens=10, messages=USER_HI)
    err = info.value
    assert err.status_code == 429
    assert err.response.headers["retry-after"] == "7"
    assert err.request_id is not None and err.request_id.startswith("req_")
    assert err.body["error"] == {"type": "rate_limit_error", "message": "slow down"}  # type: ignore[index]
    assert len(fake.requests) == 1


@pytest.mark.asyncio
async def test_mid_stream_error_event(fake: FakeAnthropic) -> None:
    fake.script({"text": "one two three four", "error_after": 2})
    stream = await client(fake).messages.create(model=MODEL, max_tokens=10, messages=USER_HI, stream=True)
    got: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as info:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                got.append(event.delta.text)
    err = info.value
    assert type(err) is anthropic.APIStatusError  # not a status-specific subclass
    assert err.status_code == 200
    assert err.type == "overloaded_error"
    assert err.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert got == ["one ", "two "]
    assert fake.requests[-1].finished is True


@pytest.mark.asyncio
async def test_drop_after_raises_while_iterating(fake: FakeAnthropic) -> None:
    fake.script({"text": "one two three four", "drop_after": 1})
    stream = await client(fake).messages.create(model=MODEL, max_tokens=10, messages=USER_HI, stream=True)
    got: list[str] = []
    # The SDK does not wrap this: the raw httpx2 transport error escapes the iterator.
    with pytest.raises((httpx2.TransportError, anthropic.APIConnectionError)):
        async for event in stream:
            if event.type == "content_block_delta":
                got.append(event.delta.text)  # type: ignore[union-attr]
    assert got == ["one "]
    rec = fake.requests[-1]
    assert rec.finished is False and rec.closed_early is False


@pytest.mark.asyncio
async def test_client_close_sets_closed_early(fake: FakeAnthropic) -> None:
    fake.script({"tokens": 200, "pace_ms": 10})
    stream = await client(fake).messages.create(model=MODEL, max_tokens=10, messages=USER_HI, stream=True)
    seen = 0
    async for event in stream:
        if event.type == "content_block_delta":
            seen += 1
            if seen == 3:
                break
    await stream.close()
    assert await wait_for(lambda: fake.requests[-1].closed_early)
    rec = fake.requests[-1]
    assert rec.finished is False and rec.events_sent < 100


# -- auth, validation, other endpoints --------------------------------------------------


@pytest.mark.asyncio
async def test_auth_x_api_key_and_missing(fake: FakeAnthropic) -> None:
    fake.api_key = "sk-right"
    body = {"model": MODEL, "max_tokens": 10, "messages": USER_HI}
    async with httpx2.AsyncClient(base_url=fake.base_url) as http:
        ok = await http.post("/v1/messages", json=body, headers={"x-api-key": "sk-right"})
        missing = await http.post("/v1/messages", json=body)
        wrong = await http.post("/v1/messages", json=body, headers={"x-api-key": "sk-wrong"})
    assert ok.status_code == 200 and ok.json()["type"] == "message"
    assert ok.headers["request-id"].startswith("req_")
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert missing.json()["request_id"] == missing.headers["request-id"]
    assert wrong.status_code == 401
    assert [r.auth for r in fake.requests] == ["x-api-key", None, "x-api-key"]
    assert all(r.headers.get("x-api-key") in (None, "<redacted>") for r in fake.requests)
    # the SDK's bearer auth with the right key works; with a wrong one it raises
    sdk = anthropic.AsyncAnthropic(api_key="sk-right", base_url=fake.base_url, max_retries=0)
    assert (await sdk.messages.create(model=MODEL, max_tokens=5, messages=USER_HI)).type == "message"
    with pytest.raises(anthropic.AuthenticationError):
        await client(fake).messages.create(model=MODEL, max_tokens=5, messages=USER_HI)
    # SDK with x-api-key via default_headers and no bearer
    sdk2 = anthropic.AsyncAnthropic(
        api_key="unused", base_url=fake.base_url, max_retries=0,
        default_headers={"x-api-key": "sk-right", "authorization": anthropic.Omit()},
    )
    assert (await sdk2.messages.create(model=MODEL, max_tokens=5, messages=USER_HI)).type == "message"
    assert fake.requests[-1].auth == "x-api-key"


@pytest.mark.asyncio
async def test_validation_400(fake: FakeAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        await client(fake).messages.create(model=MODEL, max_tokens=10, messages=[])
    assert info.value.type == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        await client(fake).messages.create(model=MODEL, max_tokens=0, messages=USER_HI)


@pytest.mark.asyncio
async def test_count_tokens(fake: FakeAnthropic) -> None:
    result = await client(fake).messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x" * 400}])
    assert result.input_tokens >= 100
    assert fake.requests[-1].path == "/v1/messages/count_tokens"


@pytest.mark.asyncio
async def test_non_streaming_message(fake: FakeAnthropic) -> None:
    fake.script({"text": "plain answer", "usage": {"output_tokens": 42}, "stop_reason": "max_tokens"})
    resp = await client(fake).messages.create(model=MODEL, max_tokens=10, messages=USER_HI)
    assert resp.model == MODEL and resp.role == "assistant"
    assert resp.content[0].type == "text" and resp.content[0].text == "plain answer"
    assert resp.stop_reason == "max_tokens"
    assert resp.usage.output_tokens == 42 and resp.usage.input_tokens >= 1
    assert resp.usage.cache_read_input_tokens == 0 and resp.usage.cache_creation_input_tokens == 0
    assert fake.requests[-1].stream is False and fake.requests[-1].events_sent == 0


@pytest.mark.asyncio
async def test_prompt_cache_simulation(fake: FakeAnthropic) -> None:
    system = [{"type": "text", "text": "You are helpful. " * 200, "cache_control": {"type": "ephemeral"}}]
    sdk = client(fake)
    first = await sdk.messages.create(model=MODEL, max_tokens=10, system=system, messages=USER_HI)  # type: ignore[arg-type]
    second = await sdk.messages.create(
        model=MODEL, max_tokens=10, system=system,  # type: ignore[arg-type]
        messages=[*USER_HI, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}],
    )
    assert first.usage.cache_creation_input_tokens and first.usage.cache_creation_input_tokens > 500
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.input_tokens >= 1
    # streamed message_start carries the same fields
    async with sdk.messages.stream(model=MODEL, max_tokens=10, system=system, messages=USER_HI) as s:  # type: ignore[arg-type]
        final = await s.get_final_message()
    assert final.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens


@pytest.mark.asyncio
async def test_directive_in_message_text(fake: FakeAnthropic) -> None:
    content = 'please #fake{"text": "from the directive", "usage": {"input_tokens": 7}} thanks'
    resp = await client(fake).messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": content}])
    assert resp.content[0].text == "from the directive"  # type: ignore[union-attr]
    assert resp.usage.input_tokens == 7
    assert fake.requests[-1].source == "directive"
    # a directive can inject errors too
    with pytest.raises(anthropic.PermissionDeniedError):
        await client(fake).messages.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": '#fake{"status": 403}'}]
        )


@pytest.mark.asyncio
async def test_default_offline_model_calculator_loop(fake: FakeAnthropic) -> None:
    sdk = client(fake)
    echo = await sdk.messages.create(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "  hello \n\n  offline   world "}]
    )
    assert echo.content[0].text == OFFLINE_PREFIX + "hello offline world"  # type: ignore[union-attr]
    question = [{"role": "user", "content": "What is (12 + 3) * 4?"}]
    first = await sdk.messages.create(model=MODEL, max_tokens=50, tools=[CALCULATOR], messages=question)  # type: ignore[list-item]
    assert first.stop_reason == "tool_use"
    call = first.content[0]
    assert call.type == "tool_use" and call.name == "calculator" and call.input == {"expression": "(12 + 3) * 4"}
    second = await sdk.messages.create(
        model=MODEL, max_tokens=50, tools=[CALCULATOR],  # type: ignore[list-item]
        messages=[
            *question,
            {"role": "assistant", "content": [call.model_dump(include={"type", "id", "name", "input"})]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "60"}]},
        ],
    )
    assert second.content[0].text == "The result is 60."  # type: ignore[union-attr]
    assert second.stop_reason == "end_turn"


@pytest.mark.asyncio
async def test_control_endpoints(fake: FakeAnthropic) -> None:
    async with httpx2.AsyncClient(base_url=fake.base_url) as http:
        r = await http.post("/_fake/script", json=[{"text": "a"}, {"text": "b", "times": 2}])
        assert r.status_code == 200 and fake.queued == 3
        sdk = client(fake)
        texts = [(await sdk.messages.create(model=MODEL, max_tokens=5, messages=USER_HI)).content[0].text for _ in range(4)]  # type: ignore[union-attr]
        assert texts[:3] == ["a", "b", "b"] and texts[3].startswith(OFFLINE_PREFIX)
        recorded = (await http.get("/_fake/requests")).json()
        assert len(recorded) == 4 and recorded[0]["headers"]["authorization"] == "<redacted>"
        assert (await http.post("/_fake/reset")).status_code == 200
        assert fake.requests == [] and (await http.get("/_fake/requests")).json() == []


# -- as a process -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_module_main_prints_line_and_serves() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.fake_anthropic", "--port", "0",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert line.startswith("fake-anthropic listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        sdk = anthropic.AsyncAnthropic(api_key="test", base_url=url, max_retries=0)
        resp = await sdk.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "ping"}])
        assert resp.content[0].text == OFFLINE_PREFIX + "ping"  # type: ignore[union-attr]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
