"""`GET /openapi.json`: a hand-written OpenAPI 3.1 document (routes take raw JSON validated in
`requests.py`: no models to generate it from); `tests/test_openapi.py` checks it is valid, complete
and true. WebSocket endpoints are `GET` with a `101` response and `x-websocket: true`."""

from __future__ import annotations

from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .config import EFFORTS, THINKING_DISPLAYS
from .errors import ERRORS
from .requests import IMAGES, MIN_THINKING_BUDGET, ON_BUSY
from .sessions import MAX_PAGE, MAX_TITLE_CHARS, PREVIEW_CHARS, TITLE_CHARS, TITLE_SOURCES

_STRING = {"type": "string"}
_TEXT = {"schema": _STRING}
_BOOL = {"type": "boolean"}
_NUMBER = {"type": "number"}
_INT = {"type": "integer", "minimum": 0}
_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,64}$"}
_NULLABLE_STRING = {"type": ["string", "null"]}
_ON_BUSY = {"enum": sorted(ON_BUSY)}
_RID = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
_WS = {"x-websocket": True}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Any], *required: str, **extra: Any) -> dict[str, Any]:
    return {"type": "object", **extra, "properties": properties, **({"required": list(required)} if required else {})}


def _response(description: str, content: dict[str, Any] | None = None, **headers: Any) -> dict[str, Any]:
    """A response with `content` ({media type: media type object}) and X-Request-ID (+ `headers`)."""
    return {"description": description, **({"content": content} if content else {}), "headers": {**_RID, **headers}}


def _json(schema: str, description: str) -> dict[str, Any]:
    """A JSON response whose body is the component schema named `schema`."""
    return _response(description, {"application/json": {"schema": _ref(schema)}})


_error = partial(_json, "ErrorResponse")


def _errors(*statuses: int) -> dict[str, Any]:
    """Error responses, each listing the codes that come with its status (from errors.ERRORS)."""
    return {str(status): _error("\n".join(f"- `{code}`{' (retryable)' * retryable}: {message}"
                                          for code, (s, retryable, message) in ERRORS.items() if s == status))
            for status in statuses}


_EVENT_COMMON = {"id": {"type": "string", "description": "`<turn_id>:<seq>`: the SSE `id` and the resume "
                        "position (`Last-Event-ID`, WebSocket `last_event_id`)."}}


def _event(type_: str, description: str, props: dict[str, Any], *required: str) -> dict[str, Any]:
    return _obj({"type": {"const": type_}, **_EVENT_COMMON, **props}, "type", "id", *required, description=description)


_TOOL = {"tool_use_id": _STRING, "name": _STRING}
_SERVER = {"server": {"const": True, "description": "A server tool (web search, web fetch, code execution): run by "
                      "the model service, not this server. Absent for this server's tools."}}
_USAGE = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_USAGE_DETAILS = {
    "thinking_tokens": {**_INT, "description": "How many of `output_tokens` were thinking (when non-zero)."},
    "web_search_requests": {**_INT, "description": "Web searches run (billed per search; when non-zero)."},
    "web_fetch_requests": {**_INT, "description": "Web fetches run (when non-zero)."},
}
_DISPLAY = {"enum": list(THINKING_DISPLAYS), "description": "`omitted`: thinking is not streamed (only signed)."}
_THINKING = {"description": "Extended thinking, in the Messages API's shape (if the server allows client "
             "thinking); omit for the server's default.", "oneOf": [
    _obj({"type": {"const": "enabled"}, "display": _DISPLAY,
          "budget_tokens": {"type": "integer", "minimum": MIN_THINKING_BUDGET,
                            "description": "Less than the turn's `max_tokens`."}},
         "type", "budget_tokens", additionalProperties=False),
    _obj({"type": {"const": "adaptive"}, "display": _DISPLAY}, "type", additionalProperties=False),
    _obj({"type": {"enum": ["disabled", "between_tools"]}}, "type", additionalProperties=False),
]}
_DOCUMENT_SOURCE = {"oneOf": [
    _obj({"type": {"const": "base64"}, "media_type": {"const": "application/pdf"},
          "data": {"type": "string", "contentEncoding": "base64", "description": "At most MAX_DOCUMENT_BYTES "
                   "decoded and MAX_DOCUMENT_PAGES pages."}}, "type", "media_type", "data"),
    _obj({"type": {"const": "url"}, "url": {"type": "string", "format": "uri", "pattern": "^https://",
                                            "maxLength": 2048, "description": "A PDF."}}, "type", "url"),
    _obj({"type": {"const": "text"}, "media_type": {"const": "text/plain"},
          "data": {"type": "string", "minLength": 1, "description": "Counts toward MAX_MESSAGE_CHARS."}},
         "type", "media_type", "data"),
]}

_SUMMARY = {
    "session_id": _STRING,
    "title": {"type": ["string", "null"], "description": "From the first user message at once (text cut at "
              f"{TITLE_CHARS} characters, else the first attachment's name), then maybe from TITLE_MODEL, or "
              "the owner's (`PATCH`)."},
    "title_source": {"enum": [*TITLE_SOURCES, None], "description": "`message`, `model` or `user` (a `user` title is "
                     "never replaced)."},
    "created_at": {**_NUMBER, "description": "Unix seconds."},
    "updated_at": {**_NUMBER, "description": "Unix seconds of the last activity (creation, a finished turn): "
                   "the list's order."},
    "turns": _INT,
    "preview": {"type": "string", "maxLength": PREVIEW_CHARS, "description": "The last message's text (user or "
                f"assistant), whitespace collapsed, at most {PREVIEW_CHARS} characters."},
    "usage": _ref("Usage"), "estimated_cost_usd": _NUMBER,
    "running_turn_id": _NULLABLE_STRING,
}

SCHEMAS: dict[str, Any] = {
    "Error": _obj({
        "code": {"type": "string", "enum": sorted(ERRORS)}, "message": _STRING, "retryable": _BOOL,
        "retry_after": {"type": "number", "description": "Seconds to wait (also the Retry-After header)."},
        "field": {"type": "string", "description": "The request field at fault."},
        "limit": {"type": "string", "description": "Which rate limit was hit."},
        "turn_id": _STRING, "upstream_request_id": _STRING,
        "partial_text": {"type": "string", "description": "Text streamed before a mid-turn failure."},
    }, "code", "message", "retryable",
        description="Every failure: a stable `code`, a human `message`, and whether retrying can help."),
    "ErrorResponse": _obj({"error": _ref("Error"), "session_id": _STRING, "turn_id": _STRING}, "error"),
    "ContentBlock": {"oneOf": [
        _obj({"type": {"const": "text"}, "text": {"type": "string", "minLength": 1}}, "type", "text"),
        _obj({"type": {"const": "image"}, "source": {"oneOf": [
            _obj({"type": {"const": "base64"}, "media_type": {"enum": sorted(IMAGES)},
                  "data": {"type": "string", "contentEncoding": "base64"}}, "type", "media_type", "data"),
            _obj({"type": {"const": "url"}, "url": {"type": "string", "format": "uri", "pattern": "^https://"}},
                 "type", "url"),
        ]}}, "type", "source"),
        _obj({"type": {"const": "document"}, "source": _DOCUMENT_SOURCE, "title": _STRING, "context": _STRING,
              "citations": _obj({"enabled": _BOOL}, description="Let the answer cite passages of the document "
                                "(as `citation` events).")},
             "type", "source", description="At most MAX_DOCUMENTS per message."),
    ]},
    "TurnRequest": _obj({
        "message": {"oneOf": [{"type": "string", "minLength": 1},
                              {"type": "array", "minItems": 1, "items": _ref("ContentBlock")}],
                    "description": "Required, except to regenerate (`replace_turn` without a message)."},
        "replace_turn": {**_ID, "description": "Edit or regenerate: the session goes back to just before this "
                         "turn (it and every later turn are replaced, when the new turn commits an answer) and the "
                         "new turn runs there, with `message` (an edit) or that turn's own message (a regenerate). "
                         "Needs `session_id`; `turn_not_found` (404), `nothing_to_regenerate` (409)."},
        "session_id": {**_ID, "description": "Continue this session; omit to start a new one."},
        "system": {"type": "string", "description": "System prompt (if the server allows client prompts)."},
        "model": {"type": "string", "description": "One of the server's ALLOWED_MODELS."},
        "max_tokens": {"type": "integer", "minimum": 1, "description": "Capped at MAX_OUTPUT_TOKENS."},
        "message_id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$",
                       "description": "Idempotency key: a retried request joins the turn it started."},
        "on_busy": {**_ON_BUSY, "default": "reject",
                    "description": "If a turn is running: 409 `session_busy`, or cancel it and start."},
        "cancel_on_disconnect": {"type": "boolean", "default": False,
                                 "description": "Cancel the turn when the client goes away."},
        "response_schema": {"type": "object", "description": "JSON Schema the answer must match "
                            "(structured output; the result is in `structured`)."},
        "thinking": _THINKING,
        "effort": {"enum": list(EFFORTS), "description": "How much effort the model spends (`output_config.effort`); "
                   "omit for the server's default (if the server allows client thinking)."},
        "client_tools": {"type": "array", "maxItems": 64, "description": "Tools the client runs itself: the model's "
                         "calls to them (validated against `input_schema`) arrive as `client_tool_call` events, and "
                         "the turn waits for the result (`POST /sessions/{session_id}/tool-results`, or a WebSocket "
                         "`tool_result` frame).", "items": _obj({
                             "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
                             "description": {"type": "string", "maxLength": 10000},
                             "input_schema": {"type": "object", "description": "A JSON Schema of `type: object`."}},
                             "name", "input_schema")},
    }, description="One user message; the answer continues the session's conversation."),
    "ToolApproval": _obj({"tool_use_id": _STRING, "approved": _BOOL,
                          "reason": {"type": "string", "maxLength": 2000, "description": "Shown to the model with "
                                     "a denial."}}, "tool_use_id", "approved",
                         description="A decision on a tool call that waits for approval (TOOLS_REQUIRING_APPROVAL)."),
    "ToolResultAnswer": _obj({"tool_use_id": _STRING, "is_error": _BOOL, "output": {
        "description": "Text, a list of `text` and `image` content blocks, or any JSON value (sent as its JSON text)."}},
        "tool_use_id", "output", description="The result of a client tool call the turn waits for."),
    "ToolAnswerAccepted": _obj({"session_id": _STRING, "turn_id": _STRING, "tool_use_id": _STRING},
                               "session_id", "turn_id", "tool_use_id",
                               description="Recorded; the turn (wherever it runs) goes on. Follow it with "
                                           "`GET /sessions/{session_id}/stream`."),
    "WaitingForTools": _obj({
        "session_id": _STRING, "turn_id": _STRING, "status": {"const": "waiting_for_tools"},
        "pending": {"type": "array", "items": _obj({**_TOOL, "input": {}, "kind": {"enum": ["approval", "client"]},
                                                    "timeout_s": _NUMBER}, "tool_use_id", "name", "input", "kind")},
        "tool_calls": {"type": "array", "items": _ref("ToolCall")}},
        "session_id", "turn_id", "status", "pending",
        description="`POST /agent` when the turn waits for answers: send them, then follow the turn's stream."),
    "Usage": _obj({**{k: _INT for k in _USAGE}, **_USAGE_DETAILS}, *_USAGE),
    "ToolCall": _obj({**_TOOL, **_SERVER, "input": {}, "is_error": _BOOL, "output": {}, "error": {}},
                     "tool_use_id", "name"),
    "TurnResult": _obj({
        "session_id": _STRING, "turn_id": _STRING,
        "stop_reason": {"type": ["string", "null"], "description": "The model's (end_turn, max_tokens, tool_use, "
                        "stop_sequence, refusal, model_context_window_exceeded, ...) or cancelled."},
        "finish": {"enum": ["complete", "truncated", "refused", "cancelled", "unknown"], "description": "How the "
                   "turn ended: `complete` (end_turn, stop_sequence), `truncated` (max_tokens, "
                   "model_context_window_exceeded), `refused` (refusal), `cancelled`, or `unknown` (a stop_reason "
                   "this server does not know)."},
        "stop_sequence": {"type": "string", "description": "The stop sequence that ended the answer."},
        "stop_details": {"type": "object", "description": "The model service's details of the stop (e.g. a "
                         "refusal's category)."},
        "truncated": _BOOL, "cancelled": _BOOL, "text": _STRING,
        "usage": _ref("Usage"), "estimated_cost_usd": _NUMBER, "model": _STRING,
        "model_calls": _INT, "request_id": _NULLABLE_STRING,
        "request_ids": {"type": "array", "items": _STRING},
        "structured": {"description": "The parsed answer when `response_schema` was given."},
        "tool_calls": {"type": "array", "items": _ref("ToolCall")},
        "thinking": {"type": "string", "description": "`POST /agent` only: the thinking text (the `thinking_delta` "
                     "events joined), when there was some."},
        "citations": {"type": "array", "items": {"type": "object"}, "description": "`POST /agent` only: the "
                      "citations (of the `citation` events), when there were some."},
    }, "session_id", "turn_id", "stop_reason", "finish", "text", "usage", "estimated_cost_usd", "model",
        description="The whole answer of `POST /agent` (the `turn_end` event plus `tool_calls`)."),
    "Event": {"description": "A turn event: SSE `data:` (with the same `id:`) or one WebSocket text frame.", "oneOf": [
        _event("turn_start", "The turn began.",
               {"session_id": _STRING, "turn_id": _STRING, "model": _STRING, "max_tokens": _INT,
                "user_text": {"type": "string", "description": "The text of the turn's user message (its text "
                              "blocks, one per line): what a client coming back to a running turn shows."},
                "rewound_turns": {"type": "array", "items": _STRING, "description": "(`replace_turn`) The turns "
                                  "this one replaces, once it commits an answer."},
                "traceparent": {"type": "string", "description": "With tracing on: the W3C trace context of "
                                "the turn's span (a follower links to it)."}},
               "session_id", "turn_id"),
        _event("text_delta", "Streamed answer text.", {"text": _STRING}, "text"),
        _event("thinking_delta", "Streamed thinking text (never part of `text`).", {"thinking": _STRING}, "thinking"),
        _event("thinking_redacted", "Part of the thinking was encrypted for safety (a `redacted_thinking` "
               "block, kept and sent back): nothing to show.", {}),
        _event("citation", "A citation of the text that follows it (a document, web search or web fetch "
               "result), as the model service gives it.", {"citation": {"type": "object"}}, "citation"),
        _event("tool_call", "The model started a tool call.", {**_TOOL, **_SERVER}, "tool_use_id", "name"),
        _event("tool_input", "The tool call's complete input.",
               {**_TOOL, **_SERVER, "input": {}, "valid": _BOOL, "error": _STRING},
               "tool_use_id", "name", "input", "valid"),
        _event("tool_result", "The tool's result. A server tool's `output` (or `error`) is its result block's "
               "`content` as the model service gives it.",
               {**_TOOL, **_SERVER, "is_error": _BOOL, "output": {}, "error": {},
                "client": {"const": True, "description": "One of the request's `client_tools`: the client's result."},
                "result_type": {"type": "string", "description": "A server tool's result block type, e.g. "
                                "`web_search_tool_result`."}},
               "tool_use_id", "name", "is_error"),
        _event("tool_approval_request", "The tool call needs a person's approval: the turn waits (up to `timeout_s`) "
               "for a decision from any worker. `pending` lists every call this pause waits for.",
               {**_TOOL, "approval_id": _STRING, "input": {}, "timeout_s": _NUMBER,
                "pending": {"type": "array", "items": _STRING}}, "tool_use_id", "name", "input", "pending"),
        _event("client_tool_call", "A call to one of the request's `client_tools`: the turn waits for the client's "
               "result. `pending` lists every call this pause waits for.",
               {**_TOOL, "input": {}, "timeout_s": _NUMBER, "pending": {"type": "array", "items": _STRING}},
               "tool_use_id", "name", "input", "pending"),
        _event("tool_approval", "The decision on a call that waited for approval (`timed_out`: none came in time).",
               {"tool_use_id": _STRING, "approved": _BOOL, "reason": _STRING, "timed_out": _BOOL},
               "tool_use_id", "approved"),
        _event("context_compacted", "The history outgrew CONTEXT_TOKEN_BUDGET: its older turns were summarised "
               "(CONTEXT_STRATEGY=summarize), and the model sees the summary in their place from now on.",
               {"covers_messages": _INT, "summary_chars": _INT}, "covers_messages", "summary_chars"),
        _event("structured_output", "The answer parsed against `response_schema`.", {"data": {}}, "data"),
        _event("structured_output_retry", "The answer did not match the schema; the model is asked "
               "once more.", {"error": _STRING}, "error"),
        {"allOf": [_ref("TurnResult"), _obj({"type": {"const": "turn_end"}, **_EVENT_COMMON}, "type", "id")],
         "description": "The last event of a completed or cancelled turn."},
        {"allOf": [_ref("Error"), _obj({"type": {"const": "error"}, **_EVENT_COMMON}, "type")],
         "description": "The last event of a failed turn (with `id`), or a refused WebSocket frame (without)."},
    ]},
    "WsClientFrame": {"description": "Frames a client sends on `WS /agent/ws` (JSON text).", "oneOf": [
        {"allOf": [_obj({"type": {"const": "message"}}, "type"), _ref("TurnRequest")]},
        _obj({"type": {"const": "cancel"}}, "type"),
        _obj({"type": {"const": "resume"}, "turn_id": _STRING, "last_event_id": _STRING}, "type"),
        {"allOf": [_obj({"type": {"const": "tool_approval"}}, "type"), _ref("ToolApproval")]},
        {"allOf": [_obj({"type": {"const": "tool_result"}}, "type"), _ref("ToolResultAnswer")]},
        _obj({"type": {"enum": ["ping", "pong"]}}, "type"),
    ]},
    "SessionSummary": _obj(_SUMMARY, *_SUMMARY, description="A session as a list of conversations shows it."),
    "SessionList": _obj({"sessions": {"type": "array", "items": _ref("SessionSummary")},
                         "next_cursor": {"type": ["string", "null"], "description": "Pass as `cursor` for the next "
                                         "page; null on the last page."}}, "sessions", "next_cursor"),
    "SessionRename": _obj({"title": {"type": "string", "minLength": 1, "maxLength": MAX_TITLE_CHARS,
                                     "description": "Whitespace is collapsed; control characters are refused "
                                                    "(as blanks)."}}, "title", additionalProperties=False),
    "SessionView": _obj({
        **_SUMMARY,
        "messages": {"type": "array", "description": "The history in Messages API shape.",
                     "items": _obj({"role": {"enum": ["user", "assistant"]}, "content": {}}, "role", "content")},
        "turn_records": {"type": "array", "items": {"type": "object"}},
        "summary": {"oneOf": [{"type": "null"}, _obj({"text": _STRING, "covers_messages": _INT}, "text",
                                                      "covers_messages")],
                    "description": "Compaction: what the model sees in place of the first `covers_messages` messages "
                                   "(all of which stay here)."},
    }, *_SUMMARY, "messages", "turn_records",
        description="A session: its summary (as `GET /sessions` lists it), history and turn records."),
    "CancelResult": _obj({"session_id": _STRING, "cancelled_turn_id": _NULLABLE_STRING},
                         "session_id", "cancelled_turn_id"),
    "Health": _obj({"status": {"const": "ok"}, "upstream": {"enum": ["anthropic", "offline"]},
                    "offline_model": {"type": "boolean", "description": "True: answers come from the bundled "
                                      "offline model, not from Claude (no ANTHROPIC_API_KEY)."},
                    "store": {"enum": ["redis", "memory"]}, "accepting_turns": _BOOL}, "status", "offline_model"),
    "Ready": _obj({"status": {"enum": ["ready", "not_ready"]}, "store": _BOOL, "accepting_turns": _BOOL,
                   "mcp": {"type": "object", "description": "With MCP_SERVERS: each server's connection in this worker "
                           "(a server that is down does not make the worker unready).",
                           "additionalProperties": _obj({"state": {"enum": ["up", "starting", "down"]},
                                                         "tools": _INT, "error": _STRING}, "state", "tools")}},
                  "status"),
    "WsTicket": _obj({"ticket": _STRING, "expires_in": _NUMBER, "expires_at": _NUMBER}, "ticket", "expires_in"),
    "UIChatRequest": _obj({
        "id": {"type": "string", "minLength": 1, "maxLength": 256, "description": "The chat id (a session)."},
        "trigger": {"enum": ["submit-message", "regenerate-message"], "description": "`regenerate-message`, or "
                    "`submit-message` with `messageId` and a user message last (an edit), rewinds the chat to just "
                    "after the assistant message before the last user message (its id is a turn id)."},
        "messageId": {"type": "string", "description": "The message regenerated or edited; with the assistant "
                      "message last, the turn whose paused tool calls it answers."},
        "messages": {"type": "array", "minItems": 1, "items": _obj({
            "id": _STRING, "role": {"enum": ["user", "assistant", "system"]},
            "parts": {"type": "array", "items": {"type": "object"}}}, "role")},
        "model": _STRING, "max_tokens": {"type": "integer", "minimum": 1}, "system": _STRING,
        "on_busy": _ON_BUSY, "cancel_on_disconnect": _BOOL,
    }, "id", "messages", description="The body `useChat` (Vercel AI SDK, DefaultChatTransport) sends; only the "
                                     "last user message is used (the history is on the server)."),
}


def _param(name: str, where: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema, **extra}


def _op(tag: str, op_id: str, summary: str, responses: dict[str, Any], body: str = "", **extra: Any) -> dict[str, Any]:
    """One operation; `body` names the JSON request body's schema, `extra` adds OpenAPI keys."""
    if body:
        extra["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return {"operationId": op_id, "summary": summary, "tags": [tag], "responses": responses, **extra}


_SESSION_ID = [_param("session_id", "path", _ID)]
_SSE_HEADERS = {"X-Session-ID": {"schema": _STRING, "description": "The session (new or continued)."},
                "X-Turn-ID": {"schema": _STRING, "description": "The turn being streamed."}}
_SSE = _response("Server-Sent Events: `id: <turn_id>:<seq>` and `data: <Event JSON>` per event, `: keep-alive` "
                 "comments while idle; ends after `turn_end` or `error`.",
                 {"text/event-stream": {"schema": _STRING, "x-event-schema": _ref("Event")}}, **_SSE_HEADERS)
_UI_SSE = _response("The AI SDK UI message stream (protocol v1): `data: <chunk JSON>` lines ending with "
                    "`data: [DONE]`; header `x-vercel-ai-ui-message-stream: v1`.",
                    {"text/event-stream": _TEXT}, **_SSE_HEADERS)
_TURN_ERRORS = _errors(400, 401, 403, 404, 408, 409, 413, 429, 500, 502, 503, 504)
_SESSION_ERRORS = _errors(400, 401, 404)
_WS_ERRORS = {"401": _error("An API key or ticket is required (`unauthorized`)."), "403": _error("`forbidden_origin`.")}

PATHS: dict[str, dict[str, Any]] = {
    "/agent": {"post": _op("turns", "runTurn", "Run one turn and return the whole answer", {
        "200": _json("TurnResult", "The answer."),
        "202": _json("WaitingForTools", "The turn waits for tool approvals or client tool results."),
        **_TURN_ERRORS}, "TurnRequest")},
    "/agent/stream": {"post": _op("turns", "streamTurn", "Run one turn, streamed as Server-Sent Events", {
        "200": _SSE, **_TURN_ERRORS}, "TurnRequest",
        description="Errors before the first event are HTTP statuses with a JSON body; after it they "
                    "arrive as an `error` event. Resume with `GET /sessions/{session_id}/stream`.")},
    "/agent/ws": {"get": _op("turns", "agentWebSocket", "Many turns over one WebSocket", {
        "101": {"description": "Switching Protocols: the WebSocket is open.",
                "content": {"application/json": {"schema": _ref("Event")}}},
        **_WS_ERRORS, "429": _error("Too many open streams (`rate_limited`).")}, **_WS,
        parameters=[_param("session_id", "query", _ID), _param("ticket", "query", _STRING)], description=(
            "Upgrade to a WebSocket (`Upgrade: websocket`). Client frames: `WsClientFrame` (`message`, `cancel`, "
            "`resume` {turn_id, last_event_id}, `ping`); server frames: `Event` objects, `{\"type\":\"ping\"}` "
            "heartbeats, `{\"type\":\"pong\"}`, `{\"type\":\"no_active_turn\"}` after a resume with nothing to "
            "resume, and `error` objects without `id` for refused frames. `?session_id=` binds the connection "
            "to an existing session (else the first message creates one). Browsers authenticate with the "
            "subprotocols `agent` + `bearer.<key>` or `?ticket=` from `POST /ws-ticket`."))},
    "/sessions": {"get": _op("sessions", "listSessions", "The caller's sessions, newest activity first", {
        "200": _json("SessionList", "A page of sessions."), **_errors(400, 401)},
        parameters=[_param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 20}),
                    _param("cursor", "query", _STRING, description="`next_cursor` of the previous page.")],
        description="Only the sessions of the caller's key. Ordered by `updated_at`, then `session_id` (both "
                    "descending); a cursor names the last session of its page, so paging on while turns land "
                    "never repeats or skips a session that did not change meanwhile. Expired and deleted "
                    "sessions are not listed.")},
    "/sessions/{session_id}": {
        "get": _op("sessions", "getSession", "A session: summary, history, usage, cost and turn records",
                   {"200": _json("SessionView", "The session."), **_SESSION_ERRORS}, parameters=_SESSION_ID),
        "patch": _op("sessions", "renameSession", "Rename a session", {
            "200": _json("SessionSummary", "Renamed (`title_source`: `user`)."), **_SESSION_ERRORS},
            "SessionRename", parameters=_SESSION_ID),
        "delete": _op("sessions", "deleteSession", "Delete a session and its history",
                      {"204": _response("Deleted."), **_SESSION_ERRORS}, parameters=_SESSION_ID),
    },
    "/sessions/{session_id}/stream": {"get": _op(
        "sessions", "resumeStream", "Resume a turn's event stream after `Last-Event-ID`",
        {"200": _SSE, "204": _response("Nothing to resume (no recent turn, or the client is up to date)."),
         **_SESSION_ERRORS},
        parameters=[*_SESSION_ID, _param("Last-Event-ID", "header", _STRING),
                    _param("last_event_id", "query", _STRING,
                           description="The same as the header, for clients that cannot set headers.")])},
    "/sessions/{session_id}/cancel": {"post": _op(
        "sessions", "cancelTurn", "Cancel the session's running turn (wherever it runs)", {
        "202": _json("CancelResult", "Cancelled; the stream ends with `turn_end` (cancelled: true)."),
        "200": _json("CancelResult", "No turn was running."), **_SESSION_ERRORS}, parameters=_SESSION_ID)},
    "/sessions/{session_id}/tool-approvals": {"post": _op(
        "sessions", "approveToolCall", "Approve or deny a tool call the session's turn waits for", {
            "202": _json("ToolAnswerAccepted", "Recorded."), **_errors(400, 401, 404, 409)},
        "ToolApproval", parameters=_SESSION_ID)},
    "/sessions/{session_id}/tool-results": {"post": _op(
        "sessions", "sendToolResult", "The result of a client tool call the session's turn waits for", {
            "202": _json("ToolAnswerAccepted", "Recorded."), **_errors(400, 401, 404, 409, 413)},
        "ToolResultAnswer", parameters=_SESSION_ID)},
    "/ws-ticket": {"post": _op("auth", "wsTicket", "A single-use ticket for a browser WebSocket (`?ticket=`)", {
        "200": _json("WsTicket", "The ticket (valid about a minute)."), **_errors(401)})},
    "/api/chat": {"post": _op("ai-sdk", "uiChat", "Vercel AI SDK `useChat` endpoint (UI message stream)", {
        "200": _UI_SSE, **_TURN_ERRORS}, "UIChatRequest")},
    "/api/chat/{chat_id}/stream": {"get": _op("ai-sdk", "uiChatResume", "Resume a `useChat` stream", {
        "200": _UI_SSE, "204": _response("No running turn."), **_SESSION_ERRORS},
        parameters=[_param("chat_id", "path", {"type": "string", "minLength": 1, "maxLength": 256})])},
    "/api/chat/ws": {"get": _op("ai-sdk", "uiChatWebSocket", "Vercel AI SDK `WebSocketChatTransport`", {
        "101": {"description": "Switching Protocols: frames `send`/`resume`/`abort` in, `start`/`chunk`/`end`/"
                               "`error`/`no-active` out (see server/transports/ai_sdk_ws.py)."},
        **_WS_ERRORS}, **_WS)},
    "/health": {"get": _op("operations", "health", "Liveness; says whether a real model is behind the server", {
        "200": _json("Health", "The process answers.")}, security=[])},
    "/ready": {"get": _op("operations", "ready", "Readiness: the store answers and this worker takes turns", {
        "200": _json("Ready", "Ready."), "503": _json("Ready", "Not ready (draining or no store).")}, security=[])},
    "/metrics": {"get": _op("operations", "metrics", "Prometheus metrics (all workers)", {
        "200": {"description": "Prometheus text exposition format.", "content": {"text/plain": _TEXT}}})},
    "/openapi.json": {"get": _op("operations", "openapi", "This document", {"200": {
        "description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {"type": "object"}}}}}, security=[])},
    "/": {"get": _op("ui", "chatPage", "The built-in chat page (HTML)", {"200": {
        "description": "The page; it talks to `WS /agent/ws`.", "content": {"text/html": _TEXT}}}, security=[])},
    "/static/{path}": {"get": _op("ui", "chatPageAsset", "The chat page's script and stylesheet", {
        "200": {"description": "The file.", "content": {"text/javascript": _TEXT, "text/css": _TEXT}},
        "404": {"description": "No such file."}}, security=[], parameters=[_param("path", "path", _STRING)])},
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Claude agent server", "version": "1.0.0", "description": (
        "An agent on the Anthropic Messages API with server-side sessions, streamed over JSON, Server-Sent Events "
        "and WebSocket. Every response carries `X-Request-ID` (the client's, if it sent a valid one: 1-128 of "
        "`[A-Za-z0-9._:/+=@-]`).")},
    "servers": [{"url": "/"}],
    "tags": [{"name": n} for n in dict.fromkeys(op["tags"][0] for item in PATHS.values() for op in item.values())],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "headers": {"X-Request-ID": {"schema": _STRING, "description": "The request id (echoed, or generated), "
                                                                       "also in the logs."}},
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "description": "A key from "
                                           "AGENT_API_KEYS (none needed on a keyless local server)."}},
    },
    "security": [{"bearerAuth": []}, {}],
}


async def openapi_endpoint(request: Request) -> Response:
    return JSONResponse(SPEC, headers={"Cache-Control": "no-cache"})
