"""Vercel AI SDK `useChat` over HTTP: `POST /api/chat` and `GET /api/chat/{id}/stream`.

Speaks the UI message stream protocol v1 of the `ai` package (pinned and verified in tests/node):
SSE `data: <chunk JSON>` lines ending with `data: [DONE]`; ai_sdk_ws.py sends the same chunks.
`UIChunks` makes them of our events: `start`, per model call a step (`start-step`..`finish-step`)
of reasoning (`reasoning-start`, `reasoning-delta`s, `reasoning-end`: the model's thinking), text
blocks (`text-start`, `text-delta`s, `text-end`), tool calls (`tool-input-*`, `tool-output-*`;
`providerExecuted` for the API's server tools such as web search) and sources (`source-url`,
`source-document`: what the answer cites, once each), then `finish` (after `abort` if cancelled,
or `error`). The n-th chunk of a turn is always the same, so a resumed WebSocket stream skips what
the client has.

Tools that wait for the client (approval, client tools): a call needing approval gets a
`tool-approval-request` after its input; a client tool's `tool-input-available` is what makes
useChat's `onToolCall` fire. Once every call of the pause is announced, the stream ends as the
AI SDK's own server ends it (`finish-step`, `finish` "tool-calls") while the turn waits here. The
client's answer comes as the next request: the assistant message as its last message, its tool
parts `approval-responded` (addToolApprovalResponse) or `output-available`/`output-error`
(addToolOutput); the answers go to the engine and the SAME turn's chunks that follow the pause
are streamed, from a `start` with the same messageId (a denial: `tool-output-denied`).

The chat `id` is our session (history lives on the server): only the last user message is used,
its text parts and its file parts (images; PDFs and plain text as documents).
A valid session id is used as is (created on first use); any other chat id maps to a stable
session id per principal.

Edit and regenerate: an assistant message's id is its turn's id (`start.messageId`), so the
messages the client sends say where its history forks from ours. `regenerate()` (trigger
`regenerate-message`: the client dropped the answer and sends the messages before it) and an
edit (`sendMessage({text, messageId})`: `submit-message` with `messageId`, the edited user message
last) both run the final user message as a new turn that rewinds the session to just after the
last assistant message before it (its turn is kept; no assistant message before it: back to the
start); the turns after it are replaced once the new turn commits an answer (a failed one leaves
them). An assistant id that is not a turn of the session is `turn_not_found` (404). These sends
carry no idempotency key: the edited message keeps its id, and must not join the turn it started.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any, Collection
from urllib.parse import unquote_to_bytes

from starlette.requests import Request
from starlette.responses import Response

from .. import tracing
from ..config import Settings
from ..engine import Engine, TurnHandle
from ..errors import ApiError
from ..events import Event, dumps, text_literal, unlogged
from ..requests import TurnRequest, check_text, parse_json_body, parse_turn_request
from ..security import principal_of
from ..store.base import Rewind, valid_id, valid_message_id
from .forward import open_stream
from .http_api import engine_of

# `UI_MESSAGE_STREAM_HEADERS` of the `ai` package, verbatim, as the raw ASGI head; a stream adds its ids.
_RAW_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"connection", b"keep-alive"), (b"x-vercel-ai-ui-message-stream", b"v1"),
                (b"x-accel-buffering", b"no")]
DONE = b"data: [DONE]\n\n"

# `turn_end.finish` -> the `finish` chunk's finishReason; FINISH_REASONS (by stop_reason) when a
# turn_end has no `finish` (logged by an older server).
FINISHES = {"complete": "stop", "truncated": "length", "refused": "content-filter", "cancelled": "other",
            "unknown": "other"}
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "tool_use": "tool-calls", "refusal": "content-filter"}
# The events that open a step (each model call is one) and those that end an open text block
# (reasoning ends at any event but a thinking_delta; it never coexists with open text).
OPENS_STEP = frozenset({"turn_start", "text_delta", "thinking_delta", "thinking_redacted", "tool_call", "citation"})
ENDS_TEXT = frozenset({"thinking_delta", "thinking_redacted", "tool_call", "tool_input", "tool_result", "turn_end",
                       "error"})
# A citation's location type -> the media type of the cited document (`source-document`).
CITED_DOCUMENTS = {"char_location": "text/plain", "content_block_location": "text/plain",
                   "page_location": "application/pdf"}
# The turn_end keys a client gets as the message's metadata (the last two only when present).
METADATA = ("session_id", "turn_id", "model", "stop_reason", "usage", "estimated_cost_usd")
OPTIONAL_METADATA = ("finish", "stop_details")
# Body fields a client may add (DefaultChatTransport `body`, WebSocket frame `body`).
PASSED_THROUGH = ("model", "max_tokens", "system", "on_busy", "cancel_on_disconnect", "thinking", "effort",
                  "client_tools")
# The tool part states of a message that answer a paused call, by the kind of call it waits for.
ANSWERS = {"approval": ("approval-responded",), "client": ("output-available", "output-error")}
PAUSE_FINISH = '{"type":"finish","finishReason":"tool-calls"}'
MAX_CHAT_ID_CHARS = 256


def session_for_chat(chat_id: Any, principal: str) -> str:
    """The session behind an AI SDK chat id: the id itself when it is a valid session id,
    else a stable derived one (base64url of sha256(principal:chat id), 22 characters)."""
    if not isinstance(chat_id, str) or not chat_id or len(chat_id) > MAX_CHAT_ID_CHARS:
        raise ApiError("invalid_request", f"`id` (the chat id) must be a string of 1-{MAX_CHAT_ID_CHARS} "
                       "characters.", field="id")
    check_text(chat_id, "`id` (the chat id)", "id")
    if valid_id(chat_id):
        return chat_id
    digest = hashlib.sha256(f"{principal}:{chat_id}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:22]


def chat_turn_request(request: dict[str, Any], extra: dict[str, Any], principal: str,
                      settings: Settings) -> TurnRequest:
    """A TurnRequest from a `useChat` request (`extra`: its body fields): the last user message;
    a regenerate or an edit (`rewind_of`) rewinds the session before it runs."""
    session_id = session_for_chat(request.get("id"), principal)
    trigger, messages = request.get("trigger"), request.get("messages")
    if trigger not in (None, "submit-message", "regenerate-message"):
        raise ApiError("invalid_request", "`trigger` must be 'submit-message' or 'regenerate-message'.",
                       field="trigger")
    if not isinstance(messages, list) or not messages:
        raise ApiError("invalid_request", "`messages` must be a non-empty list of UI messages.", field="messages")
    if request.get("messageId") is not None and not isinstance(request["messageId"], str):
        raise ApiError("invalid_request", "`messageId` must be the id (a string) of the message to regenerate or "
                       "edit.", field="messageId")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        if trigger == "regenerate-message":
            raise ApiError("invalid_request", "To regenerate an answer, send the messages before it: the last "
                           "message must be the user message to answer again.", field="messages")
        raise ApiError("invalid_request", "The last message must be a user message.", field="messages")
    body = {k: extra[k] for k in PASSED_THROUGH if k in extra}
    body |= {"message": _content(last.get("parts")), "session_id": session_id}
    citations = extra.get("citations", False)
    if not isinstance(citations, bool):
        raise ApiError("invalid_request", "`citations` must be a boolean.", field="citations")
    if citations and isinstance(body["message"], list):  # (attached files: cite them)
        for block in body["message"]:
            if block["type"] == "document":
                block["citations"] = {"enabled": True}
    rewind = rewind_of(request, messages)
    if rewind is None and valid_message_id(last.get("id")):
        body["message_id"] = last["id"]  # a retried send joins the turn it started
    req = parse_turn_request(body, settings)
    req.create_if_missing = True
    req.rewind = rewind
    return req


def rewind_of(request: dict[str, Any], messages: list[Any]) -> Rewind | None:
    """Where a regenerate (`regenerate-message`) or an edit (`submit-message` with `messageId`)
    takes the session back to: just after the turn of the last assistant message before the final
    user message (our assistant message ids are turn ids), or to the start when there is none.
    None for a plain send."""
    if request.get("trigger") != "regenerate-message" and request.get("messageId") is None:
        return None
    for message in reversed(messages[:-1]):
        if isinstance(message, dict) and message.get("role") == "assistant":
            turn_id = message.get("id")
            if not valid_id(turn_id):
                raise ApiError("invalid_request", "An assistant message's `id` must be the id of its turn "
                               "(the `start` chunk's messageId) to regenerate or edit after it.", field="messages")
            return Rewind(turn_id, keep=True)
    return Rewind(None, keep=True)


def _content(parts: Any) -> str | list[dict[str, Any]]:
    """UI message parts -> our message: text parts, and file parts as image or document blocks."""
    if not isinstance(parts, list):
        raise ApiError("invalid_request", "The last message has no `parts`.", field="messages")
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str) and part["text"].strip():
            blocks.append({"type": "text", "text": check_text(part["text"], f"`messages[-1].parts[{i}].text`",
                                                              "messages")})
        elif kind == "file":
            blocks.append(_file(part))
        # step-start, data-*, reasoning...: nothing the model should see from a user message
    if not blocks:
        raise ApiError("invalid_request", "The last user message has no text.", field="messages")
    return blocks[0]["text"] if len(blocks) == 1 and blocks[0]["type"] == "text" else blocks


def _file(part: dict[str, Any]) -> dict[str, Any]:
    """A file part (`{mediaType, url, filename?}`): an image, a PDF or a plain-text document block.
    The blocks are validated (sizes, https URLs, base64) with every message, in requests.py."""
    media_type, url = part.get("mediaType"), part.get("url")
    if not isinstance(media_type, str) or not isinstance(url, str):
        raise ApiError("invalid_request", "A file part needs a `mediaType` and a `url`.", field="messages")
    kind = media_type.partition(";")[0].strip().lower()
    if kind.startswith("image/"):
        return _image(media_type, url)
    if kind not in ("application/pdf", "text/plain"):
        raise ApiError("invalid_request", "Only images, PDFs and plain-text files can be attached.",
                       field="messages")
    if kind == "application/pdf":
        source = _source_of(url, "application/pdf",
                            ApiError("invalid_document", "A PDF data URL must be base64.", field="messages"))
    else:
        source = {"type": "text", "media_type": "text/plain", "data": _text_file(url)}
    document: dict[str, Any] = {"type": "document", "source": source}
    filename = part.get("filename")
    if isinstance(filename, str) and filename.strip():
        document["title"] = filename
    return document


def _text_file(url: str) -> str:
    """The UTF-8 text of a text/plain data URL (base64, as browsers make them, or percent-encoded)."""
    header, comma, data = url.partition(",")
    if not url.startswith("data:") or not comma:
        raise ApiError("invalid_document", "A text file must be attached as a data: URL.", field="messages")
    try:
        raw = base64.b64decode(data, validate=True) if header.endswith(";base64") else unquote_to_bytes(data)
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):  # (UnicodeDecodeError is a ValueError)
        raise ApiError("invalid_document", "A text file must be UTF-8 text in a valid data: URL.",
                       field="messages") from None


def _image(media_type: str, url: str) -> dict[str, Any]:
    return {"type": "image", "source": _source_of(url, media_type,
                                                  ApiError("invalid_image", "An image data URL must be base64."))}


def _source_of(url: str, media_type: str, not_base64: ApiError) -> dict[str, Any]:
    """A file part's URL as a block's source: a data URL's base64 data, else the URL itself
    (validated, https only, with the message in requests.py)."""
    if not url.startswith("data:"):
        return {"type": "url", "url": url}
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise not_base64
    return {"type": "base64", "media_type": media_type, "data": data}


def _source(citation: Any) -> tuple[Any, dict[str, Any]] | None:
    """A citation -> (what it cites, the source chunk less its sourceId), or None for a location
    this server does not know: a URL (web search results, or any citation with a `url`), else a
    document of the user's message (by its index: `document_title` or "Document <n>"), or a
    search result block's `source` (a URL, or a name)."""
    if not isinstance(citation, dict):
        return None
    url, title = citation.get("url"), citation.get("title")
    if citation.get("type") == "search_result_location" and not (isinstance(url, str) and url):
        source = citation.get("source")  # (a search_result block of the request: a URL, or a name)
        if not isinstance(source, str) or not source:
            return None
        if not source.startswith(("https://", "http://")):
            return (("search_result", citation.get("search_result_index"), source),
                    {"type": "source-document", "mediaType": "text/plain",
                     "title": title if isinstance(title, str) and title else source})
        url = source
    if isinstance(url, str) and url:
        chunk: dict[str, Any] = {"type": "source-url", "url": url}
        if isinstance(title, str):
            chunk["title"] = title
        return ("url", url), chunk
    media_type = CITED_DOCUMENTS.get(citation.get("type"))  # type: ignore[arg-type]
    index = citation.get("document_index")
    if media_type is None or isinstance(index, bool) or not isinstance(index, int):
        return None
    title = citation.get("document_title")
    return ("document", index), {"type": "source-document", "mediaType": media_type,
                                 "title": title if isinstance(title, str) and title else f"Document {index + 1}"}


class UIChunks:
    """One turn's events, fed in order from its first, as UI message chunks (compact JSON text).

    `answered`: a continuation, after the client answered these paused calls: the chunks up to
    the end of their pause are made (the state needs them) but not returned (the client has them);
    what follows starts with `start`. `paused_seq` is the seq of the event that completed the
    latest pause: a sink whose batch ends there ends the stream with `pause_ending()`."""

    def __init__(self, turn_id: str, answered: Collection[str] = ()):
        self.start = dumps({"type": "start", "messageId": turn_id})
        self.pending = [self.start]  # (for the next feed)
        self.step_open = False
        self.text_id: str | None = None
        self.reasoning_id: str | None = None  # (never open together with text_id)
        self.text_blocks = 0
        self.reasoning_blocks = 0
        self.open_calls: set[str] = set()  # the step's client tool calls still without a result
        self.server_calls: set[str] = set()  # the turn's server tool calls the client has seen
        self.sources: dict[Any, str] = {}  # what is cited -> its sourceId
        self.done = False
        self.waiting: set[str] | None = None  # the pause's calls not announced yet (None: no pause open)
        self.denied: set[str] = set()  # calls the user denied (their error tool_result is not a chunk)
        self.paused_seq = -1
        self.answered = self.sent = frozenset(answered)
        if self.answered:  # (the instance's `feed` until the answered pause: the live path is untouched)
            self.feed = self._replaying  # type: ignore[method-assign]

    def feed(self, event: Event) -> list[str]:
        if self.done:
            return []
        out, self.pending = self.pending, []
        kind = event.type
        if not self.step_open and kind in OPENS_STEP:
            self.step_open = True
            self.open_calls.clear()
            out.append('{"type":"start-step"}')
        if kind == "text_delta":
            if self.text_id is None:
                if self.reasoning_id is not None:
                    self._end_reasoning(out)
                self.text_blocks += 1
                self.text_id = f"text-{self.text_blocks}"
                out.append(f'{{"type":"text-start","id":"{self.text_id}"}}')
            out.append(f'{{"type":"text-delta","id":"{self.text_id}","delta":{text_literal(event)}}}')
            return out
        if self.reasoning_id is not None and kind != "thinking_delta":
            self._end_reasoning(out)
        if self.text_id is not None and kind in ENDS_TEXT:
            out.append(f'{{"type":"text-end","id":"{self.text_id}"}}')
            self.text_id = None
        e = json.loads(event.data)
        if kind == "thinking_redacted":  # an empty reasoning part, marked (as the AI SDK's Anthropic provider does)
            self.reasoning_blocks += 1
            rid = f"reasoning-{self.reasoning_blocks}"
            out.append(f'{{"type":"reasoning-start","id":"{rid}","providerMetadata":{{"anthropic":{{"redacted":true}}}}}}')
            out.append(f'{{"type":"reasoning-end","id":"{rid}"}}')
        elif kind == "thinking_delta":
            if self.reasoning_id is None:
                self.reasoning_blocks += 1
                self.reasoning_id = f"reasoning-{self.reasoning_blocks}"
                out.append(f'{{"type":"reasoning-start","id":"{self.reasoning_id}"}}')
            thinking = e.get("thinking")
            out.append(f'{{"type":"reasoning-delta","id":"{self.reasoning_id}","delta":'
                       f'{dumps(thinking if isinstance(thinking, str) else "")}}}')
        elif kind == "citation":
            self._cite(out, e.get("citation"))
        elif e.get("server") is True and kind in ("tool_call", "tool_input", "tool_result"):
            self._server_tool(out, kind, e)
        elif kind == "tool_call":
            self.open_calls.add(e["tool_use_id"])
            out.append(dumps({"type": "tool-input-start", "toolCallId": e["tool_use_id"], "toolName": e["name"]}))
        elif kind == "tool_input":
            chunk = {"type": "tool-input-available", "toolCallId": e["tool_use_id"], "toolName": e["name"],
                     "input": e.get("input")}
            if not e.get("valid", True):
                chunk.update(type="tool-input-error", errorText=str(e.get("error") or "Invalid tool input."))
            out.append(dumps(chunk))
        elif kind == "tool_result":
            call_id, error = e["tool_use_id"], e.get("error")
            # (a denied call is `output-denied`, its error result is the model's; a client tool's result
            # sent with this very request is the client's own, as it gave it)
            if call_id not in self.denied and not (e.get("client") and call_id in self.sent):
                out.append(dumps({"type": "tool-output-error", "toolCallId": call_id,
                                  "errorText": error if isinstance(error, str) else dumps(error)} if e.get("is_error")
                                 else {"type": "tool-output-available", "toolCallId": call_id,
                                       "output": e.get("output")}))
            self.open_calls.discard(e["tool_use_id"])
            if not self.open_calls:
                self._close_step(out)
        elif kind == "tool_approval_request":
            out.append(dumps({"type": "tool-approval-request", "approvalId": e.get("approval_id") or e["tool_use_id"],
                              "toolCallId": e["tool_use_id"]}))
            self._announced(event.seq, e)
        elif kind == "client_tool_call":  # (its tool-input-available is already out: onToolCall fires on it)
            self._announced(event.seq, e)
        elif kind == "tool_approval":
            if not e.get("approved"):
                self.denied.add(e["tool_use_id"])
                out.append(dumps({"type": "tool-output-denied", "toolCallId": e["tool_use_id"]}))
        elif kind == "turn_end":
            self._finish(out, e)
        elif kind == "error":
            out.append(dumps({"type": "error", "errorText": str(e.get("message") or "The turn failed.")}))
            out.append('{"type":"finish","finishReason":"error"}')
        self.done = event.terminal
        return out

    def _announced(self, seq: int, e: dict[str, Any]) -> None:
        """A paused call was announced; the last one of its pause completes the pause."""
        if self.waiting is None:
            self.waiting = {i for i in e.get("pending") or () if isinstance(i, str)}
        self.waiting.discard(e["tool_use_id"])
        if self.waiting:
            return
        self.waiting = None
        if not self.answered:
            self.paused_seq = seq
        elif self.answered.intersection(e.get("pending") or ()):
            self.answered = frozenset()  # the pause the client answered: what follows is new to it
            self.step_open = False  # (it got this step's finish-step when its stream ended here)
        # (else an earlier pause of a continuation, answered before: the stream never ends there)

    def pause_ending(self) -> list[str]:
        """The end of a stream at a pause (the turn waits for the client): as the AI SDK's server ends one."""
        out: list[str] = []
        self._close_step(out)
        out.append(PAUSE_FINISH)
        return out

    def _replaying(self, event: Event) -> list[str]:
        """`feed` of a continuation until the answered pause: chunks made, none returned."""
        if event.terminal:  # the turn ended first (cancelled, failed): the client sees how it ended
            self.answered = frozenset()
            self.step_open = False
        else:
            UIChunks.feed(self, event)
        if self.answered:
            return []
        del self.feed  # (the class's again)
        self.pending = [self.start]
        return self.feed(event) if event.terminal else []

    def _finish(self, out: list[str], e: dict[str, Any]) -> None:
        """turn_end: `finish` (after `abort` if cancelled), the turn's outcome as its metadata.
        (Not inlined in `feed`: a comprehension over `e` there would make it a cell variable,
        a cost on every text delta.)"""
        self._close_step(out)
        finish = e.get("finish")
        if e.get("cancelled") or finish == "cancelled":
            out.append('{"type":"abort","reason":"cancelled"}')
            reason = "other"
        elif isinstance(finish, str):
            reason = FINISHES.get(finish, "other")
        else:  # (no `finish`: by the model's stop_reason)
            reason = FINISH_REASONS.get(e.get("stop_reason") or "", "other")
        metadata = {k: e.get(k) for k in METADATA} | {k: e[k] for k in OPTIONAL_METADATA if k in e}
        out.append(dumps({"type": "finish", "finishReason": reason, "messageMetadata": metadata}))

    def _server_tool(self, out: list[str], kind: str, e: dict[str, Any]) -> None:
        """A tool the API runs (web search, code execution...): `providerExecuted`, and its result
        does not end the step (the model call goes on; only client tool results end one)."""
        call_id, name = str(e.get("tool_use_id")), str(e.get("name") or "server_tool")
        if kind == "tool_call" or call_id not in self.server_calls:  # (a result for a call never shown)
            self.server_calls.add(call_id)
            out.append(dumps({"type": "tool-input-start", "toolCallId": call_id, "toolName": name,
                              "providerExecuted": True}))
        if kind == "tool_input":
            out.append(dumps({"type": "tool-input-available", "toolCallId": call_id, "toolName": name,
                              "input": e.get("input"), "providerExecuted": True}))
        elif kind == "tool_result":
            if e.get("is_error"):
                error = e.get("error")
                code = error.get("error_code") if isinstance(error, dict) else None
                text = error if isinstance(error, str) else f"{name}: {code}" if isinstance(code, str) else dumps(error)
                out.append(dumps({"type": "tool-output-error", "toolCallId": call_id, "errorText": text,
                                  "providerExecuted": True}))
            else:
                out.append(dumps({"type": "tool-output-available", "toolCallId": call_id, "output": e.get("output"),
                                  "providerExecuted": True}))

    def _cite(self, out: list[str], citation: Any) -> None:
        """A `source-*` chunk the first time something is cited in this turn."""
        found = _source(citation)
        if found is None or found[0] in self.sources:
            return
        key, chunk = found
        source_id = self.sources[key] = f"source-{len(self.sources) + 1}"
        out.append(dumps({"type": chunk.pop("type"), "sourceId": source_id, **chunk}))

    def _end_reasoning(self, out: list[str]) -> None:
        out.append(f'{{"type":"reasoning-end","id":"{self.reasoning_id}"}}')
        self.reasoning_id = None

    def ending(self) -> list[str]:
        """After a follow that ended without the terminal event (the worker stops): `server_restarting`."""
        return self.feed(unlogged(0, "error", ApiError("server_restarting").payload()))

    def _close_step(self, out: list[str]) -> None:
        if self.step_open:
            self.step_open = False
            out.append('{"type":"finish-step"}')


class ChunkEvents(UIChunks):
    """The framing of /api/chat's SSE: each chunk as `data: <chunk>`, `data: [DONE]` last."""

    def frames(self, batch: list[Event]) -> bytes:
        return b"".join(b"data: " + c.encode() + b"\n\n" for e in batch for c in self.feed(e))

    def closing(self) -> bytes:
        return b"".join(b"data: " + c.encode() + b"\n\n" for c in self.ending()) + DONE

    def pause_closing(self) -> bytes:
        return b"".join(b"data: " + c.encode() + b"\n\n" for c in self.pause_ending()) + DONE


def continued_message(request: dict[str, Any]) -> dict[str, Any] | None:
    """The assistant message a `useChat` request continues (it answers that message's paused
    tool calls), or None: the request sends a user message."""
    messages = request.get("messages")
    if request.get("trigger") == "regenerate-message" or not isinstance(messages, list) or not messages:
        return None  # (a regenerate, or refused by chat_turn_request)
    last = messages[-1]
    return last if isinstance(last, dict) and last.get("role") == "assistant" else None


def tool_answers(message: dict[str, Any], pending: dict[str, str]) -> list[dict[str, Any]]:
    """The engine's answers from the tool parts of `message` that answer a `pending` call
    (tool_use_id -> "approval" | "client"): approvals from `approval-responded` parts
    (addToolApprovalResponse), client tool results from `output-available`/`output-error` ones
    (addToolOutput). Parts of calls that are not pending, or not answered yet, are ignored."""
    parts = message.get("parts")
    answers: list[dict[str, Any]] = []
    for part in parts if isinstance(parts, list) else ():
        if not isinstance(part, dict) or not isinstance(kind := part.get("type"), str):
            continue
        call_id = part.get("toolCallId")
        wanted = pending.get(call_id) if isinstance(call_id, str) else None
        if not (kind.startswith("tool-") or kind == "dynamic-tool") or part.get("state") not in ANSWERS.get(wanted, ()):
            continue
        if wanted == "approval":
            approval = part.get("approval")
            approved = approval.get("approved") if isinstance(approval, dict) else None
            if not isinstance(approved, bool):
                raise ApiError("invalid_request", "An `approval-responded` tool part needs `approval.approved`.",
                               field="messages")
            answer: dict[str, Any] = {"tool_use_id": call_id, "approved": approved}
            reason = approval.get("reason")  # type: ignore[union-attr]
            if isinstance(reason, str) and reason.strip():
                answer["reason"] = check_text(reason, "`approval.reason`", "messages")
        elif part["state"] == "output-error":
            error = part.get("errorText")
            answer = {"tool_use_id": call_id, "output": error if isinstance(error, str) else "The tool failed.",
                      "is_error": True}
        else:
            answer = {"tool_use_id": call_id, "output": part.get("output")}
        answers.append(answer)
    return answers


async def answer_paused_tools(engine: Engine, request: dict[str, Any], message: dict[str, Any],
                              principal: str) -> tuple[str, str, set[str]]:
    """Give the engine the client's answers in `message` (`continued_message`) to the chat's
    paused calls: (session id, turn id, the calls answered). Nothing pending that the message
    answers: `tool_call_not_pending` (409)."""
    session_id = session_for_chat(request.get("id"), principal)
    if request.get("trigger") not in (None, "submit-message"):
        raise ApiError("invalid_request", "`trigger` must be 'submit-message'.", field="trigger")
    try:
        _turn_id, pending = await engine.pending_tools(session_id, principal)
    except ApiError as exc:  # (a chat never used, or not this principal's: nothing of it is pending either)
        if exc.code != "session_not_found":
            raise
        pending = {}
    answers = tool_answers(message, pending)
    if not answers:
        raise ApiError("tool_call_not_pending", "The last message is the assistant's, but none of its tool "
                       "calls waits for an answer: send a user message instead.")
    turn_id = await engine.answer_tools(session_id, principal, answers)
    return session_id, turn_id, {a["tool_use_id"] for a in answers}


async def chat(request: Request) -> Response:
    """`POST /api/chat`: `{id, messages, trigger, messageId?, ...body}` -> the UI message stream
    (of a new turn; or, answering paused tool calls, of the paused turn from that pause on)."""
    engine = engine_of(request)
    principal = principal_of(request)
    body = parse_json_body(await request.body())
    if (message := continued_message(body)) is not None:
        session_id, turn_id, answered = await answer_paused_tools(engine, body, message, principal)
        return await open_stream(engine, session_id, turn_id, ChunkEvents(turn_id, answered), _RAW_HEADERS,
                                 wait=False, cancel_on_disconnect=body.get("cancel_on_disconnect") is True)
    req = chat_turn_request(body, body, principal, engine.settings)
    handle = await start_chat_turn(engine, req, principal)
    return await open_stream(engine, handle.session_id, handle.turn_id, ChunkEvents(handle.turn_id),
                             _RAW_HEADERS, wait=False, cancel_on_disconnect=req.cancel_on_disconnect)


async def start_chat_turn(engine: Engine, req: TurnRequest, principal: str) -> TurnHandle:
    """`Engine.start` of a chat's turn; a rewind to a turn the session does not have is
    `turn_not_found` (404) in the AI SDK's terms: the message id is not a turn of the chat."""
    try:
        return await engine.start(req, principal)
    except ApiError as exc:
        rewind = req.rewind
        if exc.code != "turn_not_found" or rewind is None or rewind.turn_id is None:
            raise
        raise ApiError("turn_not_found", f"The assistant message {rewind.turn_id} is not a turn of this chat (an "
                       "assistant message's id is its turn's id, the `start` chunk's messageId), so the chat "
                       "cannot be taken back to it.", field="messages") from None


async def chat_resume(request: Request) -> Response:
    """`GET /api/chat/{id}/stream`: the running turn replayed from its start; 204 when idle."""
    engine = engine_of(request)
    principal = principal_of(request)
    session_id = session_for_chat(request.path_params["chat_id"], principal)
    turn_id, running = await chat_turn(engine, session_id, principal)
    turn_id = turn_id if running else None  # (a finished turn is not resumed over HTTP)
    if tracing.enabled and turn_id is not None:
        await engine.link_turn(session_id, turn_id)
    return await open_stream(engine, session_id, turn_id, ChunkEvents(turn_id or ""), _RAW_HEADERS, wait=False)


async def chat_turn(engine: Engine, session_id: str, principal: str) -> tuple[str | None, bool]:
    """The chat's running or recent turn (`Engine.resumable_turn`); none for a chat never used."""
    try:
        return await engine.resumable_turn(session_id, principal)
    except ApiError as exc:
        if exc.code != "session_not_found":
            raise
        return None, False
