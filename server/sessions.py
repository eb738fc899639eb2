"""A conversation as a list shows it: its title, a preview of its last message, the summary
`GET /sessions` and `PATCH /sessions/{id}` answer with, and the opaque paging cursor.

Titles come from three places (`title_source`): the first user message at once ("message"), a
short model call after the first answer when TITLE_MODEL is set ("model": replaces only a
"message" title), and the owner (`PATCH`, "user": never replaced).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Mapping

from .errors import ApiError
from .store.base import SessionMeta, valid_id

TITLE_CHARS = 80        # a title made from the first message
PREVIEW_CHARS = 160
MAX_TITLE_CHARS = 200   # a title the owner (or the model) gives
DEFAULT_PAGE, MAX_PAGE = 20, 100
TITLE_SOURCES = ("message", "model", "user")
# The title model's fixed instruction; `max_tokens` TITLE_MAX_TOKENS keeps the call short and cheap.
TITLE_INSTRUCTION = ("Write a title for the conversation below: at most 6 words, in the language of the "
                     "conversation, no quotes, no final punctuation. Answer with the title only.")
TITLE_MAX_TOKENS = 24
TITLE_INPUT_CHARS = 2000  # of the question and of the answer, sent to the title model
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def clean(text: str) -> str:
    """Whitespace collapsed; control characters, and unpaired surrogates (Redis stores UTF-8:
    one cannot be encoded), made spaces."""
    return " ".join(_CONTROL.sub(" ", text).split())


def head(text: str, limit: int) -> str:
    """`shorten(clean(text), limit)` without cleaning all of a long text."""
    size = limit * 4
    while True:
        cleaned = clean(text[:size])
        if len(cleaned) > limit or size >= len(text):
            return shorten(cleaned, limit)
        size *= 4


def shorten(text: str, limit: int) -> str:
    """At most `limit` characters, cut on a word boundary with "…" when it is cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    if " " in cut and not text[limit - 1].isspace():
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip() + "…"


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return " ".join(b["text"] for b in content if isinstance(b, Mapping) and b.get("type") == "text"
                    and isinstance(b.get("text"), str))


def message_title(message: Mapping[str, Any]) -> str:
    """The title a session gets from its first user message: its text, else the first
    attachment's name (a document's title: the file name the AI SDK sent), else its kind."""
    content = message.get("content")
    text = head(text_of(content), TITLE_CHARS)
    if text:
        return text
    for block in content if isinstance(content, list) else []:
        if isinstance(block, Mapping) and block.get("type") in ("image", "document"):
            name = clean(block["title"]) if isinstance(block.get("title"), str) else ""
            return shorten(name, TITLE_CHARS) if name else block["type"].capitalize()
    return "Conversation"


def preview(messages: list[Mapping[str, Any]]) -> str:
    """The last message's text with any (user or assistant), collapsed, at most PREVIEW_CHARS;
    "" when none has text (a turn that committed nothing, or only tool traffic)."""
    for message in reversed(messages):
        text = head(text_of(message.get("content")), PREVIEW_CHARS)
        if text:
            return text
    return ""


def model_title(answer: str) -> str:
    """The title model's answer as a title: one line, no quotes around it, no final period."""
    title = clean(answer).strip(" \"'`“”‘’«»*#").rstrip(".").strip()
    return shorten(title, MAX_TITLE_CHARS)


def user_title(value: Any) -> str:
    """`PATCH /sessions/{id}`'s `title`: text of 1-200 characters (whitespace collapsed)."""
    if not isinstance(value, str):
        raise ApiError("invalid_request", "`title` must be a string.", field="title")
    title = clean(value)
    if not 1 <= len(title) <= MAX_TITLE_CHARS:
        raise ApiError("invalid_request", f"`title` must have 1 to {MAX_TITLE_CHARS} characters (not only "
                       "whitespace or control characters).", field="title")
    return title


def encode_cursor(position: tuple[int, str]) -> str:
    """(updated_at in ms, session id) of a page's last session, opaque to clients."""
    return base64.urlsafe_b64encode(f"{position[0]}:{position[1]}".encode()).decode().rstrip("=")


def decode_cursor(value: str | None) -> tuple[int, str] | None:
    if value is None:
        return None
    try:
        ms, sid = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode().split(":")
        if ms.isdigit() and len(ms) <= 16 and valid_id(sid):
            return int(ms), sid
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise ApiError("invalid_request", "`cursor` is not a cursor this server gave.", field="cursor")


def page_limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE
    if not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise ApiError("invalid_request", f"`limit` must be an integer from 1 to {MAX_PAGE}.", field="limit")
    return int(value)


def summary(session_id: str, meta: SessionMeta) -> dict[str, Any]:
    """A session as `GET /sessions` lists it (and `GET /sessions/{id}` starts with)."""
    return {"session_id": session_id, "title": meta.title, "title_source": meta.title_source,
            "created_at": meta.created_at, "updated_at": (meta.updated_ms / 1000) or meta.created_at,
            "turns": meta.turns, "preview": meta.preview, "usage": meta.usage.to_dict(),
            "estimated_cost_usd": round(meta.cost_usd, 8), "running_turn_id": meta.active_turn_id}
