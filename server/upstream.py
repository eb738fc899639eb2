"""One streamed call to the Messages API, as raw event dicts.

The body we encode ourselves is sent on the SDK's http client with the headers the SDK builds
(`PreparedCall`: built by the SDK once per client, not per call), retried before the first byte
by the SDK's own retry policy and failing with its typed errors; its SSE is parsed here with at
most one `json.loads` per event (a text delta: only its string is scanned). Why not the SDK's own:
`messages.stream()` rebuilds the message per event, `messages.create()` walks the request for files,
and `client.post()` rebuilds its options, headers and request on every call (about 250 µs of CPU a
call, a fifth of a short turn's).
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
import weakref
from contextlib import asynccontextmanager
from json.decoder import scanstring
from typing import Any, AsyncIterator, NamedTuple

import anthropic
import httpx2
from anthropic._models import FinalRequestOptions

from .errors import UpstreamStreamError
from .store.base import StoredMessage
from .upstream_transport import direct_body, window_end

_prepared: weakref.WeakKeyDictionary[anthropic.AsyncAnthropic, PreparedCall] = weakref.WeakKeyDictionary()
_loads = json.loads
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode
# A text delta as the Messages API writes it: read without building its two dicts.
_TEXT_DELTA_HEAD = '{"type":"content_block_delta","index":'
_TEXT_DELTA_BODY = ',"delta":{"type":"text_delta","text":"'
_TEXT_DELTA_EVENT = "event: content_block_delta\ndata: "  # (the block's lines as the API writes them)
_TEXT_DELTA_BLOCK = _TEXT_DELTA_EVENT + _TEXT_DELTA_HEAD
_TEXT_DELTA_DATA = len(_TEXT_DELTA_EVENT)
_TEXT_DELTA_INDEX = len(_TEXT_DELTA_BLOCK)


class TextDelta(NamedTuple):
    """A text `content_block_delta` (the hot path); `json`: the text's JSON string as sent, if usual."""
    index: int
    text: str
    json: str | None


class UpstreamStream:
    """An open streamed response: `request_id`, and `events()`. With `coalesce` seconds > 0, after the first
    content delta the body is read at most once per window, so a burst of tokens is handled at a time (see
    `Connection.linger`). A body from our transport is kept without its httpx2 response, request and headers."""

    def __init__(self, response: httpx2.Response, coalesce: float = 0.0):
        self._coalesce = coalesce
        self.request_id: str | None = response.headers.get("request-id")
        body = direct_body(response)
        if body is not None:
            self._read, self._linger, self.aclose = body.read, body.linger, body.aclose
        else:
            self._read = functools.partial(anext, response.aiter_bytes(), b"")
            self._linger, self.aclose = _sleep, response.aclose

    async def events(self) -> AsyncIterator[dict[str, Any] | TextDelta]:
        """The stream's events as dicts, except text deltas: `TextDelta`s."""
        # (a character may span two reads; a malformed byte becomes U+FFFD, not a failed turn)
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        buffer = ""
        saw_stop = coalescing = False
        read, linger = self._read, self._linger
        try:
            while chunk := await read():
                buffer += decode(chunk)
                if "\r" in buffer:
                    buffer = buffer.replace("\r\n", "\n")
                start = 0
                while (end := buffer.find("\n\n", start)) >= 0:
                    event = _parse_block(buffer, start, end)
                    start = end + 2
                    if type(event) is TextDelta:
                        coalescing = self._coalesce > 0
                        yield event
                        continue
                    if event is None:
                        continue
                    kind = event.get("type")
                    if kind == "error":
                        err = event.get("error") or {}
                        raise UpstreamStreamError(str(err.get("type") or "api_error"),
                                                  str(err.get("message") or ""), self.request_id)
                    if kind == "message_stop":
                        saw_stop = True
                    elif kind == "content_block_delta":
                        coalescing = self._coalesce > 0
                    yield event
                buffer = buffer[start:]
                if coalescing and not saw_stop:
                    await linger(self._coalesce, b"message_stop")
        except (anthropic.APITimeoutError, httpx2.TimeoutException) as exc:
            raise UpstreamStreamError("timeout_error", "read timeout", self.request_id) from exc
        except (anthropic.APIConnectionError, OSError, httpx2.TransportError) as exc:
            raise UpstreamStreamError("connection_error", type(exc).__name__, self.request_id) from exc
        if not saw_stop:
            raise UpstreamStreamError("connection_error", "stream ended early", self.request_id)


async def _sleep(seconds: float, marker: bytes) -> None:
    """`linger()` for a body from another transport."""
    now = asyncio.get_running_loop().time()
    await asyncio.sleep(window_end(now, seconds) - now)


def _parse_block(buffer: str, start: int, end: int) -> dict[str, Any] | TextDelta | None:
    """The SSE block `buffer[start:end]`: its data's JSON, a `TextDelta`, or None without data."""
    if buffer.startswith(_TEXT_DELTA_BLOCK, start):  # the usual text delta: straight to its index
        data = start + _TEXT_DELTA_DATA
        head_end = start + _TEXT_DELTA_INDEX
    else:
        if buffer.startswith("data:", start):
            data = start + 5
        else:
            data = buffer.find("\ndata:", start, end)
            if data < 0:
                return None
            data += 6
        if buffer.startswith(" ", data):
            data += 1
        head_end = data + len(_TEXT_DELTA_HEAD) if buffer.startswith(_TEXT_DELTA_HEAD, data) else 0
    if head_end:
        body = buffer.find(_TEXT_DELTA_BODY, head_end, end)
        if body > 0 and buffer[head_end:body].isdigit():
            opening = body + len(_TEXT_DELTA_BODY)
            try:  # (a raw newline is not allowed in a JSON string: it cannot run past `end`)
                text, closing = scanstring(buffer, opening)
            except ValueError:
                closing = -1
            if closing == end - 2 and buffer.startswith("}}", closing):
                return TextDelta(int(buffer[head_end:body]), text, buffer[opening - 1:closing])
    try:
        event = _loads(buffer[data:end])  # (leading spaces are JSON whitespace)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    if event.get("type") == "content_block_delta":  # a text delta in another form
        delta, index = event.get("delta"), event.get("index")
        if (isinstance(delta, dict) and delta.get("type") == "text_delta" and isinstance(index, int)
                and isinstance(text := delta.get("text"), str)):
            return TextDelta(index, text, None)
    return event


class RawJSON(bytes):
    """A request parameter already encoded as JSON (the tool definitions), spliced in as is."""


def encode_request(params: dict[str, Any]) -> bytes:
    """The streamed call's request body; stored messages and `RawJSON` values go in as they are."""
    rest = {key: value for key, value in params.items() if key != "messages" and type(value) is not RawJSON}
    spliced = b"".join([b',"%b":%b' % (k.encode(), v) for k, v in params.items() if type(v) is RawJSON])
    head = _dumps({**rest, "stream": True}).encode()  # '{...}': the rest goes in before its closing brace
    messages = b",".join([m.raw if type(m) is StoredMessage else _dumps(m).encode() for m in params["messages"]])
    return b"%b%b,\"messages\":[%b]}" % (head[:-1], spliced, messages)


def messages_url(client: anthropic.AsyncAnthropic) -> httpx2.URL:
    """The Messages API URL (given as a URL, the SDK does not join a path on every request)."""
    base = client.base_url
    return base.copy_with(raw_path=base.raw_path + b"v1/messages")


class PreparedCall:
    """`POST /v1/messages` (streamed) as `client.post` sends it, its per-call work done once:
    the headers are those the SDK builds (its auth, version and platform headers), less the
    retry count, which each attempt sets as the SDK does. Attempts go out on the SDK's http client
    (its transport, hooks and timeouts); retries and errors are decided by the SDK's own policy
    (`_should_retry`, `_should_retry_exception`, `_sleep_for_retry`, `_make_status_error_from_response`):
    connection errors, 408/409/429/5xx, `retry-after`, `x-should-retry`, typed errors with their
    request id. A client with what would change a request per call (credentials refreshed by the
    SDK, custom auth, SDK middleware, idempotency keys) is sent through `client.post` instead."""

    def __init__(self, client: anthropic.AsyncAnthropic):
        self.client = client
        self.url = messages_url(client)
        self.direct = (getattr(client, "_token_cache", None) is None and client.custom_auth is None
                       and not getattr(client, "_middleware", None) and client._idempotency_header is None)
        self.options = FinalRequestOptions.construct(method="post", url=str(self.url), content=b"")  # type: ignore[arg-type]
        template = client._build_request(self.options, retries_taken=0)
        self.headers = [(k, v) for k, v in template.headers.raw
                        if k.lower() not in (b"x-stainless-retry-count", b"content-length")]
        self.extensions = template.extensions

    async def send(self, body: bytes, betas: str | None) -> httpx2.Response:
        """The response (2xx, its body not read yet), or the SDK's error once retries are spent."""
        client = self.client
        if not self.direct:
            options: Any = {"headers": {"anthropic-beta": betas}} if betas else {}
            return await client.post(self.url, cast_to=httpx2.Response,  # type: ignore[arg-type]
                                     content=body, options=options, stream=True, stream_cls=None)
        max_retries = client.max_retries
        for retries_taken in range(max_retries + 1):
            headers = [*self.headers, (b"x-stainless-retry-count", b"%d" % retries_taken)]
            if betas:
                headers.append((b"anthropic-beta", betas.encode()))
            request = httpx2.Request("POST", self.url, headers=headers, content=body, extensions=self.extensions)
            try:
                try:
                    response = await client._client.send(request, stream=True)
                except httpx2.TimeoutException as exc:
                    raise anthropic.APITimeoutError(request=request) from exc
                except anthropic.AnthropicError:
                    raise
                except Exception as exc:
                    raise anthropic.APIConnectionError(request=request) from exc
            except anthropic.APIConnectionError as exc:  # (APITimeoutError included)
                if retries_taken >= max_retries or not client._should_retry_exception(exc)[0]:
                    raise
                await client._sleep_for_retry(retries_taken=retries_taken, max_retries=max_retries,
                                              options=self.options, response=None)
                continue
            if response.is_success:
                return response
            if retries_taken < max_retries and client._should_retry(response):
                await response.aclose()
                await client._sleep_for_retry(retries_taken=retries_taken, max_retries=max_retries,
                                              options=self.options, response=response)
                continue
            await response.aread()
            raise client._make_status_error_from_response(response) from None
        raise RuntimeError("unreachable: the last attempt returns or raises")


@asynccontextmanager
async def open_stream(client: anthropic.AsyncAnthropic, params: dict[str, Any], coalesce: float = 0.0,
                      betas: str | None = None) -> AsyncIterator[UpstreamStream]:
    """Open the stream; closing it on exit also stops billing when a turn is cancelled.
    `betas`: an `anthropic-beta` header value (e.g. interleaved thinking)."""
    call = _prepared.get(client) or _prepared.setdefault(client, PreparedCall(client))
    stream = UpstreamStream(await call.send(encode_request(params), betas), coalesce)
    try:
        yield stream
    finally:
        await stream.aclose()
