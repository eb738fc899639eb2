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
from .config import Settings
from .errors import ApiError
from .store.base import valid_id, valid_message_id

IMAGES = {t: re.compile(magic, re.DOTALL) for t, magic in {  # media type -> the data's magic number
    "image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff", "image/gif": b"GIF8[79]a",
    "image/webp": b"RIFF.{4}WEBP"}.items()}
ON_BUSY = {"reject", "interrupt"}

# A lone surrogate (U+D800-U+DFFF), which json.loads makes from a `\uD800` escape, cannot be
# encoded as UTF-8 and would fail later (Redis, the upstream request, a WebSocket frame): every
# client string the server keeps is checked where it is taken (`check_text`).
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(slots=True)
class TurnRequest:
    content: str | list[dict[str, Any]]   # the user message: text, or text and image blocks
    session_id: str | None = None
    system: str | None = None
    model: str = ""
    max_tokens: int = 0
    message_id: str | None = None
    on_busy: str = "reject"
    cancel_on_disconnect: bool = False
    response_schema: dict[str, Any] | None = None
    create_if_missing: bool = False       # start `session_id` as a new session if it does not exist

    def user_message(self) -> dict[str, Any]:
        content = self.content
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
    content = _content(body.get("message"), settings)
    session_id = body.get("session_id")
    if session_id is not None:
        if not isinstance(session_id, str):
            raise _invalid("`session_id` must be a string.", "session_id")
        if not valid_id(session_id):
            raise ApiError("invalid_session_id")
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
                       max_tokens=min(max_tokens, settings.max_output_tokens), message_id=message_id,
                       on_busy=on_busy, cancel_on_disconnect=cancel_on_disconnect,
                       response_schema=schema)


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
        content, chars, images = [], 0, 0
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
            else:
                raise _invalid(f"`message[{i}].type` must be 'text' or 'image'.", "message")
    if chars > settings.max_message_chars:
        raise ApiError("message_too_long",
                       f"`message` is longer than {settings.max_message_chars} characters.", field="message")
    return check_text(content, "`message`", "message") if isinstance(content, str) else content


def _image(source: Any, i: int, settings: Settings) -> dict[str, Any]:
    where = f"`message[{i}].source`"
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
