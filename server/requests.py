"""Validation of a turn request, shared by every transport: everything a client sends is
checked before any lock is taken or any API call made, and refused with a stable error code."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from . import structured
from .config import EFFORTS, THINKING_DISPLAYS, Settings
from .errors import ApiError
from .store.base import Rewind, valid_id, valid_message_id
from .tools.registry import TOOL_NAME

IMAGES = {t: re.compile(magic, re.DOTALL) for t, magic in {  # media type -> the data's magic number
    "image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff", "image/gif": b"GIF8[79]a",
    "image/webp": b"RIFF.{4}WEBP"}.items()}
ON_BUSY = {"reject", "interrupt"}
# The `thinking` types of the API, with the keys each takes.
THINKING_KEYS = {"enabled": {"type", "budget_tokens", "display"}, "adaptive": {"type", "display"},
                 "disabled": {"type"}, "between_tools": {"type"}}
MIN_THINKING_BUDGET = 1024  # the API's minimum budget_tokens
TOOL_USE_ID = re.compile(r"[a-zA-Z0-9_-]{1,128}")  # (fullmatch) a tool call's id, as the API makes them
MAX_CLIENT_TOOLS = 64
MAX_TOOL_DESCRIPTION_CHARS = 10_000
MAX_REASON_CHARS = 2000  # a denial's reason (the model reads it)
DOCUMENT_SOURCES = ("base64", "url", "text")
# A PDF page object: `/Type /Page` (any PDF whitespace between), the name ending there: next comes
# whitespace, a delimiter or the end (`/Pages` is the page tree, `/PageLabel` a label). Pages inside
# compressed object streams are invisible to this: such a PDF counts fewer pages (or none: accepted).
_PDF_PAGE = re.compile(rb"/Type[\x00\t\n\f\r ]*/Page(?![^\x00\t\n\f\r ()<>\[\]{}/%])")

# A lone surrogate (U+D800-U+DFFF), which json.loads makes from a `\uD800` escape, cannot be
# encoded as UTF-8 and would fail later (Redis, the upstream request, a WebSocket frame): every
# client string the server keeps is checked where it is taken (`check_text`).
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(slots=True)
class TurnRequest:
    content: str | list[dict[str, Any]] | None  # the user message: text, or text, image and document blocks
    #                                           (None: a regenerate, the replaced turn's message is sent again)
    session_id: str | None = None
    system: str | None = None
    model: str = ""
    max_tokens: int = 0
    message_id: str | None = None
    on_busy: str = "reject"
    cancel_on_disconnect: bool = False
    response_schema: dict[str, Any] | None = None
    create_if_missing: bool = False       # start `session_id` as a new session if it does not exist
    thinking: dict[str, Any] | None = None  # the API's thinking config; None: the deployment's
    effort: str | None = None             # output_config.effort; None: the deployment's
    client_tools: dict[str, dict[str, Any]] | None = None  # tools the client runs: name -> API definition
    rewind: Rewind | None = None          # edit / regenerate: where the session goes back to first

    def user_message(self) -> dict[str, Any]:
        content = self.content
        assert content is not None, "a regenerate's message is the stored one"
        return {"role": "user", "content": [{"type": "text", "text": content}] if isinstance(content, str) else content}


def parse_json_body(raw: bytes | str) -> dict[str, Any]:
    """A JSON object from a request body (UTF-8 bytes) or a WebSocket text frame (str): not
    UTF-8, not JSON or nested too deep is `invalid_json`; not an object, `invalid_request`."""
    try:  # strict: json.loads(bytes) would let encoded surrogates through ("surrogatepass")
        text = raw if isinstance(raw, str) else raw.decode("utf-8-sig")  # (a leading BOM is dropped)
    except UnicodeDecodeError:
        raise ApiError("invalid_json", "The request body is not valid UTF-8 text.") from None
    try:
        body = json.loads(text)
    except ValueError:
        raise ApiError("invalid_json") from None
    except RecursionError:
        raise ApiError("invalid_json", "The JSON is nested too deeply.") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "The body must be a JSON object.")
    return body


def _invalid(message: str, field: str) -> ApiError:
    return ApiError("invalid_request", message, field=field)


def valid_text(value: str) -> bool:
    """False when `value` holds a lone surrogate (not encodable as UTF-8)."""
    return value.isascii() or _SURROGATE.search(value) is None


def check_text(value: str, where: str, field: str) -> str:
    """`value`, or `invalid_request` naming `where` when it is not valid Unicode text."""
    if not valid_text(value):
        raise _invalid(f"{where} contains a lone surrogate (U+D800-U+DFFF): text must be valid Unicode.", field)
    return value


def parse_turn_request(body: dict[str, Any], settings: Settings) -> TurnRequest:
    rewind = _replace_turn(body)
    # A regenerate (`replace_turn` without a message) sends the replaced turn's message again.
    content = None if rewind is not None and body.get("message") is None else _content(body.get("message"), settings)
    session_id = body.get("session_id")
    if session_id is not None:
        if not isinstance(session_id, str):
            raise _invalid("`session_id` must be a string.", "session_id")
        if not valid_id(session_id):
            raise ApiError("invalid_session_id")
    elif rewind is not None:
        raise _invalid("`replace_turn` needs the `session_id` of the turn's session.", "replace_turn")
    system = body.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise _invalid("`system` must be a string.", "system")
        check_text(system, "`system`", "system")
        if not settings.allow_client_system_prompt:
            raise ApiError("system_prompt_not_allowed")
        if len(system) > settings.max_message_chars:
            raise ApiError("message_too_long", "`system` is too long.", field="system")
    model = body.get("model", settings.default_model)
    if not isinstance(model, str) or model not in settings.allowed_models:
        raise ApiError("model_not_allowed",
                       f"`model` must be one of: {', '.join(settings.allowed_models)}.", field="model")
    max_tokens = body.get("max_tokens", settings.max_output_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _invalid("`max_tokens` must be a positive integer.", "max_tokens")
    max_tokens = min(max_tokens, settings.max_output_tokens)
    thinking, effort = _thinking(body, max_tokens, settings)
    message_id = body.get("message_id")
    if message_id is not None and not valid_message_id(message_id):
        raise _invalid("`message_id` must be 1-128 characters of [A-Za-z0-9._:-].", "message_id")
    on_busy = body.get("on_busy", "reject")
    if not isinstance(on_busy, str) or on_busy not in ON_BUSY:
        raise _invalid("`on_busy` must be 'reject' or 'interrupt'.", "on_busy")
    cancel_on_disconnect = body.get("cancel_on_disconnect", False)
    if not isinstance(cancel_on_disconnect, bool):
        raise _invalid("`cancel_on_disconnect` must be a boolean.", "cancel_on_disconnect")
    schema = body.get("response_schema")
    if schema is not None:
        if not isinstance(schema, dict):
            raise _invalid("`response_schema` must be a JSON Schema object.", "response_schema")
        structured.check_schema(schema)
    return TurnRequest(content=content, session_id=session_id, system=system, model=model,
                       max_tokens=max_tokens, message_id=message_id, on_busy=on_busy,
                       cancel_on_disconnect=cancel_on_disconnect, response_schema=schema,
                       thinking=thinking, effort=effort, client_tools=_client_tools(body.get("client_tools")),
                       rewind=rewind)


def _replace_turn(body: dict[str, Any]) -> Rewind | None:
    """`replace_turn`: the turn this one replaces, the session rewound to just before it (an edit
    with `message`, a regenerate without)."""
    turn_id = body.get("replace_turn")
    if turn_id is None:
        return None
    if not valid_id(turn_id):
        raise _invalid("`replace_turn` must be the id of one of the session's turns.", "replace_turn")
    return Rewind(turn_id)


def _client_tools(value: Any) -> dict[str, dict[str, Any]] | None:
    """`client_tools`: tools the client runs itself (name, description, JSON Schema of the input),
    as API tool definitions by name. The model's calls to them are validated against the schema
    before the client sees them; the turn waits for the client's result."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_CLIENT_TOOLS:
        raise _invalid(f"`client_tools` must be a list of at most {MAX_CLIENT_TOOLS} tools.", "client_tools")
    tools: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(value):
        where = f"client_tools[{i}]"
        if not isinstance(tool, dict) or set(tool) - {"name", "description", "input_schema"}:
            raise _invalid(f"`{where}` must be an object of `name`, `description` and `input_schema`.",
                           "client_tools")
        name, description, schema = tool.get("name"), tool.get("description", ""), tool.get("input_schema")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or name in tools:
            raise _invalid(f"`{where}.name` must be a unique name of 1-64 characters of [a-zA-Z0-9_-].",
                           "client_tools")
        if not isinstance(description, str) or len(description) > MAX_TOOL_DESCRIPTION_CHARS:
            raise _invalid(f"`{where}.description` must be a string of at most {MAX_TOOL_DESCRIPTION_CHARS} "
                           "characters.", "client_tools")
        check_text(description, f"`{where}.description`", "client_tools")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise _invalid(f"`{where}.input_schema` must be a JSON Schema with \"type\": \"object\".",
                           "client_tools")
        structured.check_schema(schema, f"{where}.input_schema")
        tools[name] = {"name": name, "description": description, "input_schema": schema}
    return tools or None


def parse_tool_answer(answer: Any, settings: Settings) -> tuple[str, str, str]:
    """An answer to a tool call a turn waits for (`{"tool_use_id", "approved", "reason"?}` or
    `{"tool_use_id", "output", "is_error"?}`): (tool_use_id, "approval" | "client", the answer's
    JSON as the store keeps it), or a 400 naming the field."""
    if not isinstance(answer, dict):
        raise ApiError("invalid_request", "A tool answer must be a JSON object.")
    call_id = answer.get("tool_use_id")
    if not isinstance(call_id, str) or not TOOL_USE_ID.fullmatch(call_id):
        raise ApiError("invalid_request", "`tool_use_id` must be the id of a tool call.", field="tool_use_id")
    if ("approved" in answer) == ("output" in answer):
        raise ApiError("invalid_request", "A tool answer has either `approved` (an approval) or `output` "
                       "(a client tool's result).")
    if "approved" in answer:
        reason = answer.get("reason")
        if not isinstance(answer["approved"], bool):
            raise ApiError("invalid_request", "`approved` must be a boolean.", field="approved")
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
            raise ApiError("invalid_request", f"`reason` must be a string of at most {MAX_REASON_CHARS} "
                           "characters.", field="reason")
        check_text(reason or "", "`reason`", "reason")
        return call_id, "approval", json.dumps({"approved": answer["approved"], "reason": reason})
    is_error = answer.get("is_error", False)
    if not isinstance(is_error, bool):
        raise ApiError("invalid_request", "`is_error` must be a boolean.", field="is_error")
    output = _tool_output(answer["output"], settings)
    return call_id, "client", json.dumps({"output": output, "is_error": is_error}, ensure_ascii=False)


def _tool_output(value: Any, settings: Settings) -> str | list[dict[str, Any]]:
    """A client tool's result as tool_result content: text as it is, a list of text and image
    blocks as it is (validated), any other JSON value as its JSON text."""
    if isinstance(value, list) and value and all(isinstance(b, dict) and b.get("type") in ("text", "image")
                                                 for b in value):
        content: str | list[dict[str, Any]] = []
        for i, block in enumerate(value):
            if block["type"] == "text":
                if not isinstance(block.get("text"), str) or set(block) - {"type", "text"}:
                    raise ApiError("invalid_request", f"`output[{i}]` must be a text block of a `text` string.",
                                   field="output")
                content.append({"type": "text", "text": check_text(block["text"], f"`output[{i}].text`", "output")})
            else:
                content.append(_image(block.get("source"), i, settings, f"`output[{i}].source`"))
        size = sum(len(b.get("text", "")) for b in content)
    else:
        content = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        check_text(content, "`output`", "output")
        size = len(content)
    if size > settings.max_message_chars:
        raise ApiError("message_too_long", "`output` is too long.", field="output")
    return content


def _thinking(body: dict[str, Any], max_tokens: int, settings: Settings) -> tuple[dict[str, Any] | None, str | None]:
    """The request's `thinking` and `effort`, checked here so that a mistake is a 400 naming the
    field rather than the model service's `bad_request` after a lock and a call."""
    thinking, effort = body.get("thinking"), body.get("effort")
    if (thinking is not None or effort is not None) and not settings.allow_client_thinking:
        raise ApiError("thinking_not_allowed", field="thinking" if thinking is not None else "effort")
    if effort is not None and (not isinstance(effort, str) or effort not in EFFORTS):
        raise ApiError("invalid_thinking", f"`effort` must be one of {', '.join(EFFORTS)}.", field="effort")
    budget = settings.thinking_budget_tokens
    if thinking is None:
        if budget and max_tokens <= budget:
            raise ApiError("invalid_thinking", f"`max_tokens` must be more than this server's thinking budget "
                                               f"({budget} tokens): thinking counts toward max_tokens.",
                           field="max_tokens")
        return None, effort
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if not isinstance(kind, str) or kind not in THINKING_KEYS:
        raise ApiError("invalid_thinking", "`thinking` must be an object whose `type` is "
                                           f"{', '.join(map(repr, THINKING_KEYS))}.", field="thinking")
    if set(thinking) - THINKING_KEYS[kind]:
        raise ApiError("invalid_thinking", f"`thinking` of type '{kind}' takes only "
                                           f"{', '.join(sorted(THINKING_KEYS[kind]))}.", field="thinking")
    checked: dict[str, Any] = {"type": kind}
    if kind == "enabled":
        tokens = thinking.get("budget_tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < MIN_THINKING_BUDGET:
            raise ApiError("invalid_thinking", f"`thinking.budget_tokens` must be an integer of at least "
                                               f"{MIN_THINKING_BUDGET}.", field="thinking")
        if tokens >= max_tokens:
            raise ApiError("invalid_thinking", f"`thinking.budget_tokens` ({tokens}) must be less than `max_tokens` "
                                               f"({max_tokens}).", field="thinking")
        checked["budget_tokens"] = tokens
    display = thinking.get("display")
    if display is not None:
        if not isinstance(display, str) or display not in THINKING_DISPLAYS:
            raise ApiError("invalid_thinking", f"`thinking.display` must be {' or '.join(THINKING_DISPLAYS)}.",
                           field="thinking")
        checked["display"] = display
    return checked, effort


def _deployment_thinking(settings: Settings) -> dict[str, Any] | None:
    display = {"display": settings.thinking_display} if settings.thinking_display else {}
    if settings.thinking_budget_tokens:
        return {"type": "enabled", "budget_tokens": settings.thinking_budget_tokens, **display}
    return {"type": "adaptive", **display} if settings.thinking_adaptive else None


def thinking_params(req: TurnRequest, settings: Settings) -> dict[str, Any]:
    """The Messages API parameters this turn adds for thinking and effort (`thinking`,
    `output_config`): the request's values, else the deployment's; {} when there are none."""
    params: dict[str, Any] = {}
    thinking = req.thinking if req.thinking is not None else _deployment_thinking(settings)
    if thinking is not None:
        params["thinking"] = dict(thinking)
    effort = req.effort or settings.thinking_effort
    if effort:
        params["output_config"] = {"effort": effort}
    return params


def interleaved_beta(req: TurnRequest, settings: Settings) -> bool:
    """Whether to send the interleaved-thinking beta: THINKING_INTERLEAVED, and this turn thinks
    with a budget (`enabled`; adaptive thinking interleaves without it)."""
    thinking = req.thinking if req.thinking is not None else _deployment_thinking(settings)
    return settings.thinking_interleaved and thinking is not None and thinking["type"] == "enabled"


def _content(message: Any, settings: Settings) -> str | list[dict[str, Any]]:
    if message is None:
        raise _invalid("`message` is required.", "message")
    if isinstance(message, str):
        if not message.strip():
            raise _invalid("`message` must not be empty.", "message")
        content, chars = message, len(message)
    elif not isinstance(message, list) or not message:
        raise _invalid("`message` must be a string or a non-empty list of content blocks.", "message")
    else:
        content, chars, images, documents = [], 0, 0, 0
        for i, block in enumerate(message):
            if not isinstance(block, dict):
                raise _invalid(f"`message[{i}]` must be an object.", "message")
            kind = block.get("type")
            if kind == "text":
                text = block.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise _invalid(f"`message[{i}].text` must be a non-empty string.", "message")
                check_text(text, f"`message[{i}].text`", "message")
                chars += len(text)
                content.append({"type": "text", "text": text})
            elif kind == "image":
                images += 1
                if images > settings.max_images:
                    raise ApiError("too_many_images", f"At most {settings.max_images} images per message.")
                content.append(_image(block.get("source"), i, settings))
            elif kind == "document":
                documents += 1
                if documents > settings.max_documents:
                    raise ApiError("too_many_documents", f"At most {settings.max_documents} documents per message.",
                                   field="message")
                document, text_chars = _document(block, i, settings)
                chars += text_chars
                content.append(document)
            else:
                raise _invalid(f"`message[{i}].type` must be 'text', 'image' or 'document'.", "message")
    if chars > settings.max_message_chars:
        raise ApiError("message_too_long",
                       f"`message` is longer than {settings.max_message_chars} characters.", field="message")
    return check_text(content, "`message`", "message") if isinstance(content, str) else content


def _image(source: Any, i: int, settings: Settings, where: str | None = None) -> dict[str, Any]:
    where = where or f"`message[{i}].source`"
    if not isinstance(source, dict):
        raise ApiError("invalid_image", f"{where} must be an object.")
    kind = source.get("type")
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith("https://") or len(url) > 2048:
            raise ApiError("invalid_image", f"{where}.url must be an https:// URL.")
        check_text(url, f"{where}.url", "message")
        return {"type": "image", "source": {"type": "url", "url": url}}
    if kind != "base64":
        raise ApiError("invalid_image", f"{where}.type must be 'base64' or 'url'.")
    media_type = source.get("media_type")
    if not isinstance(media_type, str) or media_type not in IMAGES:
        raise ApiError("invalid_image", f"{where}.media_type must be one of {', '.join(sorted(IMAGES))}.")
    data = source.get("data")
    if not isinstance(data, str) or not data:
        raise ApiError("invalid_image", f"{where}.data must be base64 text.")
    # Check the size before decoding: 4 base64 characters carry 3 bytes.
    if len(data) * 3 // 4 > settings.max_image_bytes + 3:
        raise ApiError("image_too_large", f"Images are limited to {settings.max_image_bytes} bytes.")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError("invalid_image", f"{where}.data is not valid base64.") from None
    if len(raw) > settings.max_image_bytes:
        raise ApiError("image_too_large", f"Images are limited to {settings.max_image_bytes} bytes.")
    if not IMAGES[media_type].match(raw):
        raise ApiError("invalid_image", f"{where}.data is not a {media_type} image.")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _bad_document(message: str) -> ApiError:
    return ApiError("invalid_document", message, field="message")


def _document(block: dict[str, Any], i: int, settings: Settings) -> tuple[dict[str, Any], int]:
    """A document block in the API's shape (the client's values, unchanged), and the characters
    of text it adds to the message (a text source, title, context: they count toward
    MAX_MESSAGE_CHARS like text blocks)."""
    where = f"`message[{i}]`"
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if not isinstance(source, dict) or not isinstance(kind, str) or kind not in DOCUMENT_SOURCES:
        raise _bad_document(f"{where}.source must be an object whose `type` is 'base64' (a PDF), 'url' (a PDF) "
                            "or 'text'.")
    chars = 0
    if kind == "base64":
        source = _pdf(source, where, settings)
    elif kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith("https://") or len(url) > 2048:
            raise _bad_document(f"{where}.source.url must be an https:// URL of at most 2048 characters.")
        source = {"type": "url", "url": check_text(url, f"{where}.source.url", "message")}
    else:
        data = source.get("data")
        if source.get("media_type") != "text/plain" or not isinstance(data, str) or not data.strip():
            raise _bad_document(f"{where}.source: a text document needs `media_type` 'text/plain' and non-empty "
                                "`data`.")
        chars += len(check_text(data, f"{where}.source.data", "message"))
        source = {"type": "text", "media_type": "text/plain", "data": data}
    document: dict[str, Any] = {"type": "document", "source": source}
    for key in ("title", "context"):
        value = block.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise _bad_document(f"{where}.{key} must be a string.")
            chars += len(check_text(value, f"{where}.{key}", "message"))
            document[key] = value
    citations = block.get("citations")
    if citations is not None:
        if not isinstance(citations, dict) or set(citations) - {"enabled"} or \
                not isinstance(citations.get("enabled", False), bool):
            raise _bad_document(f'{where}.citations must be {{"enabled": true}} or {{"enabled": false}}.')
        document["citations"] = citations
    return document, chars


def _pdf(source: dict[str, Any], where: str, settings: Settings) -> dict[str, Any]:
    """A base64 PDF source, its size checked before decoding (as for images) and its pages counted."""
    limit = settings.max_document_bytes
    data = source.get("data")
    if source.get("media_type") != "application/pdf" or not isinstance(data, str) or not data:
        raise _bad_document(f"{where}.source: a base64 document needs `media_type` 'application/pdf' and base64 "
                            "`data` (send plain text as a 'text' source).")
    if len(data) * 3 // 4 > limit + 3:
        raise ApiError("document_too_large", f"Documents are limited to {limit} bytes.", field="message")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_document(f"{where}.source.data is not valid base64.") from None
    if len(raw) > limit:
        raise ApiError("document_too_large", f"Documents are limited to {limit} bytes.", field="message")
    if b"%PDF-" not in raw[:1024]:  # (readers accept the header anywhere in the first 1 KiB)
        raise _bad_document(f"{where}.source.data is not a PDF.")
    pages = pdf_pages(raw)
    if pages > settings.max_document_pages:
        raise ApiError("document_too_large", f"{where} has {pages} pages; documents are limited to "
                                             f"{settings.max_document_pages} pages.", field="message")
    return {"type": "base64", "media_type": "application/pdf", "data": data}


def pdf_pages(raw: bytes) -> int:
    """The page objects a PDF shows (0 when they are all in compressed object streams): enough to
    refuse an oversized document before it costs an upstream call, without a PDF parser."""
    return len(_PDF_PAGE.findall(raw))
