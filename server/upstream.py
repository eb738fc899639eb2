"""One streamed call to the Messages API, as raw event dicts.

We POST the request body as JSON bytes we encode ourselves through the SDK's public
`client.post(..., cast_to=httpx2.Response, stream=True)`, and parse the SSE bytes
ourselves: at most one `json.loads` per event (a text delta, the bulk of a stream, needs
only its string scanned). The SDK's `messages.stream()` helper
rebuilds a snapshot of the whole message per event (and re-parses tool JSON), several times
the CPU per token; `messages.create()` walks and copies the whole request (the history)
looking for file inputs before encoding it, which our bodies never hold. The SDK still does
what it is good at: auth headers, retries with `retry-after` before the first byte, and
typed exceptions for error statuses.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import weakref
from contextlib import asynccontextmanager
from json.decoder import scanstring
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple

import anthropic
import httpx2

from .errors import UpstreamStreamError
from .store.base import StoredMessage
from .upstream_transport import direct_body

_urls: weakref.WeakKeyDictionary[anthropic.AsyncAnthropic, httpx2.URL] = weakref.WeakKeyDictionary()
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
    """A `content_block_delta` event carrying text (the hot path): its block index, the text,
    and the text as a JSON string (what the upstream sent, when it was in the usual form),
    so the event we emit reuses it instead of encoding the text again."""
    index: int
    text: str
    json: str | None


class UpstreamStream:
    """An open streamed response: `request_id`, and `events()` yielding parsed event dicts.

    With `coalesce` seconds > 0, once the first content delta is through, the body is read at
    most once per `coalesce`: what arrived meanwhile is handled in one go, so the turn task
    and each follower wake once per burst instead of once per token, and each client gets
    one write per burst; from the second window on, our transport does not even read the
    socket during a window (one read per burst instead of one per token). The first token
    is never delayed; the end of the answer (`message_stop`) is read as soon as it arrives
    within the first window, at most one window late after that.

    A body from our transport is kept without its httpx2 response (request and response
    objects and their headers: a few KB per open turn)."""

    def __init__(self, response: httpx2.Response, coalesce: float = 0.0):
        self._coalesce = coalesce
        self.request_id: str | None = response.headers.get("request-id")
        body = direct_body(response)
        if body is not None:
            self._read, self._linger, self.aclose = body.read, body.linger, body.aclose
        else:
            self._read, self._linger, self.aclose = _reader(response.aiter_bytes()), _sleep, response.aclose

    async def events(self) -> AsyncIterator[dict[str, Any] | TextDelta]:
        """The stream's events as dicts, except text deltas: `TextDelta`s."""
        # (a character may span two reads; a malformed byte becomes U+FFFD, not a failed turn)
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        buffer = ""
        saw_stop = False
        read, linger = self._read, self._linger
        coalescing = False
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
    """`linger()` for a body from another transport: a wait until the shared grid's tick."""
    from .upstream_transport import window_end
    loop = asyncio.get_running_loop()
    now = loop.time()
    await asyncio.sleep(window_end(now, seconds) - now)


def _reader(chunks: AsyncIterator[bytes]) -> Callable[[], Awaitable[bytes]]:
    """`read()` over an async iterator of chunks (a body from another transport, or encoded)."""
    async def read() -> bytes:
        return await anext(chunks, b"")
    return read


def _parse_block(buffer: str, start: int, end: int) -> dict[str, Any] | TextDelta | None:
    """The SSE block `buffer[start:end]` (`event: x\ndata: {...}`): its data's JSON (whose
    `type` names it), or None for a block without data (a comment, a ping). A text delta in
    the API's usual form comes back as a `TextDelta` with only its string decoded."""
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
        if isinstance(delta, dict) and delta.get("type") == "text_delta" and isinstance(index, int):
            text = delta.get("text")
            if isinstance(text, str):
                return TextDelta(index, text, None)
    return event


class RawJSON(bytes):
    """A request parameter already encoded as JSON (the tool definitions: the same bytes on
    every call), spliced into the body as is."""


def encode_request(params: dict[str, Any]) -> bytes:
    """The Messages API request body for a streamed call. Stored history messages and
    `RawJSON` values go in as they are (no decode and re-encode of a long history, or of
    the tool schemas, per call)."""
    rest: dict[str, Any] = {}
    spliced = b""
    for key, value in params.items():
        if type(value) is RawJSON:
            spliced += b',"%b":%b' % (key.encode(), value)
        elif key != "messages":
            rest[key] = value
    rest["stream"] = True
    head = _dumps(rest).encode()  # '{...}': the rest goes in before its closing brace
    messages = b",".join([m.raw if type(m) is StoredMessage else _dumps(m).encode() for m in params["messages"]])
    return b"%b%b,\"messages\":[%b]}" % (head[:-1], spliced, messages)


def messages_url(client: anthropic.AsyncAnthropic) -> httpx2.URL:
    """The Messages API URL under the client's base URL (as the SDK joins them). Handed to
    `client.post` as a URL: the SDK then skips parsing and re-joining a relative path on
    every request (~70 µs of CPU per model call)."""
    base = client.base_url
    return base.copy_with(raw_path=base.raw_path + b"v1/messages")


@asynccontextmanager
async def open_stream(client: anthropic.AsyncAnthropic, params: dict[str, Any],
                      coalesce: float = 0.0) -> AsyncIterator[UpstreamStream]:
    """Open the stream (SDK retries apply until the status line); close it on exit, which
    also cuts billing when a turn is cancelled mid-answer."""
    url = _urls.get(client)
    if url is None:
        url = _urls[client] = messages_url(client)
    response = await client.post(url, cast_to=httpx2.Response,  # type: ignore[arg-type]
                                 content=encode_request(params), stream=True, stream_cls=None)
    stream = UpstreamStream(response, coalesce)
    del response
    try:
        yield stream
    finally:
        await stream.aclose()
