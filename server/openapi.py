"""`GET /openapi.json`: a hand-written OpenAPI 3.1 description of every HTTP endpoint.

Hand-written on purpose: the routes take raw JSON validated in `requests.py`, so there are no
models to generate it from. `tests/test_openapi.py` keeps it honest: every route of the app
must appear here (with its methods), the document must pass an OpenAPI 3.1 validator, and
real responses (JSON bodies and stream events) must validate against these schemas.
WebSocket endpoints are listed as `GET` with a `101` response and `x-websocket: true`; their
frames are described in the operation and in `WsClientFrame` / `Event`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import ERRORS

VERSION = "1.0.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}},
                           "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}}
    if headers:
        out["headers"].update(headers)
    return out


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("ErrorResponse"), description)


_STRING = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,64}$"}

_EVENT_COMMON = {"id": {"type": "string", "description": "`<turn_id>:<seq>`: the SSE `id` and the resume "
                        "position (`Last-Event-ID`, WebSocket `last_event_id`)."}}


def _event(type_: str, description: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "description": description,
            "properties": {"type": {"const": type_}, **_EVENT_COMMON, **props},
            "required": ["type", "id", *required]}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every failure: a stable `code`, a human `message`, and whether retrying can help.",
        "properties": {
            "code": {"type": "string", "enum": sorted(ERRORS)},
            "message": _STRING,
            "retryable": {"type": "boolean"},
            "retry_after": {"type": "number", "description": "Seconds to wait (also the Retry-After header)."},
            "field": {"type": "string", "description": "The request field at fault."},
            "turn_id": {"type": "string"},
            "limit": {"type": "string", "description": "Which rate limit was hit."},
            "upstream_request_id": {"type": "string"},
            "partial_text": {"type": "string", "description": "Text streamed before a mid-turn failure."},
        },
        "required": ["code", "message", "retryable"],
    },
    "ErrorResponse": {
        "type": "object",
        "properties": {"error": _ref("Error"), "session_id": _STRING, "turn_id": _STRING},
        "required": ["error"],
    },
    "ContentBlock": {
        "oneOf": [
            {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string", "minLength": 1}},
             "required": ["type", "text"]},
            {"type": "object", "properties": {"type": {"const": "image"}, "source": {"oneOf": [
                {"type": "object", "properties": {
                    "type": {"const": "base64"},
                    "media_type": {"enum": ["image/png", "image/jpeg", "image/gif", "image/webp"]},
                    "data": {"type": "string", "contentEncoding": "base64"}},
                 "required": ["type", "media_type", "data"]},
                {"type": "object", "properties": {"type": {"const": "url"},
                                                  "url": {"type": "string", "format": "uri", "pattern": "^https://"}},
                 "required": ["type", "url"]},
            ]}}, "required": ["type", "source"]},
        ],
    },
    "TurnRequest": {
        "type": "object",
        "description": "One user message; the answer continues the session's conversation.",
        "properties": {
            "message": {"oneOf": [{"type": "string", "minLength": 1},
                                  {"type": "array", "minItems": 1, "items": _ref("ContentBlock")}]},
            "session_id": {**_ID, "description": "Continue this session; omit to start a new one."},
            "system": {"type": "string", "description": "System prompt (if the server allows client prompts)."},
            "model": {"type": "string", "description": "One of the server's ALLOWED_MODELS."},
            "max_tokens": {"type": "integer", "minimum": 1, "description": "Capped at MAX_OUTPUT_TOKENS."},
            "message_id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$",
                           "description": "Idempotency key: a retried request joins the turn it started."},
            "on_busy": {"enum": ["reject", "interrupt"], "default": "reject",
                        "description": "If a turn is running: 409 `session_busy`, or cancel it and start."},
            "cancel_on_disconnect": {"type": "boolean", "default": False,
                                     "description": "Cancel the turn when the client goes away."},
            "response_schema": {"type": "object", "description": "JSON Schema the answer must match "
                                "(structured output; the result is in `structured`)."},
        },
        "required": ["message"],
    },
    "Usage": {
        "type": "object",
        "properties": {"input_tokens": _INT, "output_tokens": _INT, "cache_creation_input_tokens": _INT,
                       "cache_read_input_tokens": _INT},
        "required": ["input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"],
    },
    "ToolCall": {
        "type": "object",
        "properties": {"tool_use_id": _STRING, "name": _STRING, "input": {}, "is_error": {"type": "boolean"},
                       "output": {}, "error": {}},
        "required": ["tool_use_id", "name"],
    },
    "TurnResult": {
        "type": "object",
        "description": "The whole answer of `POST /agent` (the `turn_end` event plus `tool_calls`).",
        "properties": {
            "session_id": _STRING, "turn_id": _STRING,
            "stop_reason": {"type": ["string", "null"], "description": "end_turn, max_tokens, tool_use, "
                            "stop_sequence, refusal, or cancelled."},
            "truncated": {"type": "boolean"}, "cancelled": {"type": "boolean"}, "text": _STRING,
            "usage": _ref("Usage"), "estimated_cost_usd": {"type": "number"}, "model": _STRING,
            "model_calls": _INT, "request_id": {"type": ["string", "null"]},
            "request_ids": {"type": "array", "items": _STRING},
            "structured": {"description": "The parsed answer when `response_schema` was given."},
            "tool_calls": {"type": "array", "items": _ref("ToolCall")},
        },
        "required": ["session_id", "turn_id", "stop_reason", "text", "usage", "estimated_cost_usd", "model"],
    },
    "Event": {
        "description": "A turn event: SSE `data:` (with the same `id:`) or one WebSocket text frame.",
        "oneOf": [
            _event("turn_start", "The turn began.", {"session_id": _STRING, "turn_id": _STRING, "model": _STRING,
                                                     "max_tokens": _INT}, ["session_id", "turn_id"]),
            _event("text_delta", "Streamed answer text.", {"text": _STRING}, ["text"]),
            _event("tool_call", "The model started a tool call.", {"tool_use_id": _STRING, "name": _STRING},
                   ["tool_use_id", "name"]),
            _event("tool_input", "The tool call's complete input.",
                   {"tool_use_id": _STRING, "name": _STRING, "input": {}, "valid": {"type": "boolean"},
                    "error": _STRING}, ["tool_use_id", "name", "input", "valid"]),
            _event("tool_result", "The tool's result.", {"tool_use_id": _STRING, "name": _STRING,
                                                         "is_error": {"type": "boolean"}, "output": {}, "error": {}},
                   ["tool_use_id", "name", "is_error"]),
            _event("structured_output", "The answer parsed against `response_schema`.", {"data": {}}, ["data"]),
            _event("structured_output_retry", "The answer did not match the schema; the model is asked "
                   "once more.", {"error": _STRING}, ["error"]),
            {"allOf": [_ref("TurnResult"), {"type": "object", "properties": {"type": {"const": "turn_end"},
                                                                               **_EVENT_COMMON},
                                             "required": ["type", "id"]}],
             "description": "The last event of a completed or cancelled turn."},
            {"allOf": [_ref("Error"), {"type": "object", "properties": {"type": {"const": "error"}, **_EVENT_COMMON},
                                       "required": ["type"]}],
             "description": "The last event of a failed turn (with `id`), or a refused WebSocket frame "
                            "(without)."},
        ],
    },
    "WsClientFrame": {
        "description": "Frames a client sends on `WS /agent/ws` (JSON text).",
        "oneOf": [
            {"allOf": [{"type": "object", "properties": {"type": {"const": "message"}}, "required": ["type"]},
                       _ref("TurnRequest")]},
            {"type": "object", "properties": {"type": {"const": "cancel"}}, "required": ["type"]},
            {"type": "object", "properties": {"type": {"const": "resume"}, "turn_id": _STRING,
                                              "last_event_id": _STRING}, "required": ["type"]},
            {"type": "object", "properties": {"type": {"enum": ["ping", "pong"]}}, "required": ["type"]},
        ],
    },
    "SessionView": {
        "type": "object",
        "properties": {
            "session_id": _STRING, "created_at": {"type": "number"}, "turns": _INT,
            "running_turn_id": {"type": ["string", "null"]}, "usage": _ref("Usage"),
            "estimated_cost_usd": {"type": "number"},
            "messages": {"type": "array", "description": "The history in Messages API shape.",
                         "items": {"type": "object", "properties": {"role": {"enum": ["user", "assistant"]},
                                                                    "content": {}}, "required": ["role", "content"]}},
            "turn_records": {"type": "array", "items": {"type": "object"}},
        },
        "required": ["session_id", "turns", "usage", "messages"],
    },
    "CancelResult": {
        "type": "object",
        "properties": {"session_id": _STRING, "cancelled_turn_id": {"type": ["string", "null"]}},
        "required": ["session_id", "cancelled_turn_id"],
    },
    "Health": {
        "type": "object",
        "properties": {"status": {"const": "ok"}, "upstream": {"enum": ["anthropic", "offline"]},
                       "offline_model": {"type": "boolean", "description": "True: answers come from the bundled "
                                         "offline model, not from Claude (no ANTHROPIC_API_KEY)."},
                       "store": {"enum": ["redis", "memory"]}, "accepting_turns": {"type": "boolean"}},
        "required": ["status", "offline_model"],
    },
    "Ready": {
        "type": "object",
        "properties": {"status": {"enum": ["ready", "not_ready"]}, "store": {"type": "boolean"},
                       "accepting_turns": {"type": "boolean"}},
        "required": ["status"],
    },
    "WsTicket": {
        "type": "object",
        "properties": {"ticket": _STRING, "expires_in": {"type": "number"}, "expires_at": {"type": "number"}},
        "required": ["ticket", "expires_in"],
    },
    "UIChatRequest": {
        "type": "object",
        "description": "The body `useChat` (Vercel AI SDK, DefaultChatTransport) sends; only the last user "
                       "message is used (the history is on the server).",
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": 256, "description": "The chat id (a session)."},
            "trigger": {"const": "submit-message"},
            "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                "id": _STRING, "role": {"enum": ["user", "assistant", "system"]},
                "parts": {"type": "array", "items": {"type": "object"}}}, "required": ["role"]}},
            "model": _STRING, "max_tokens": {"type": "integer", "minimum": 1}, "system": _STRING,
            "on_busy": {"enum": ["reject", "interrupt"]}, "cancel_on_disconnect": {"type": "boolean"},
        },
        "required": ["id", "messages"],
    },
}

_SESSION_ID = {"name": "session_id", "in": "path", "required": True, "schema": _ID}
_SSE_HEADERS = {
    "X-Session-ID": {"schema": _STRING, "description": "The session (new or continued)."},
    "X-Turn-ID": {"schema": _STRING, "description": "The turn being streamed."},
}
_SSE = {"description": "Server-Sent Events: `id: <turn_id>:<seq>` and `data: <Event JSON>` per event, "
                       "`: keep-alive` comments while idle; ends after `turn_end` or `error`.",
        "content": {"text/event-stream": {"schema": {"type": "string"}, "x-event-schema": _ref("Event")}},
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}, **_SSE_HEADERS}}
_UI_SSE = {"description": "The AI SDK UI message stream (protocol v1): `data: <chunk JSON>` lines ending with "
                          "`data: [DONE]`; header `x-vercel-ai-ui-message-stream: v1`.",
           "content": {"text/event-stream": {"schema": {"type": "string"}}},
           "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}, **_SSE_HEADERS}}

_TURN_ERRORS = {
    "400": _error("Invalid request (`invalid_json`, `invalid_request`, `model_not_allowed`, ...)."),
    "401": _error("An API key is required (`unauthorized`)."),
    "403": _error("`forbidden_origin` or `budget_exceeded`."),
    "404": _error("`session_not_found`."),
    "409": _error("`session_busy`: a turn is already running (see `on_busy`)."),
    "413": _error("Too large (`body_too_large`, `message_too_long`, `session_full`, ...)."),
    "429": _error("`rate_limited` (ours or the model service's); see Retry-After."),
    "502": _error("The model service failed or rejected our configuration."),
    "503": _error("`server_restarting`, `overloaded`, `upstream_overloaded`, `interrupted` or "
                  "`store_unavailable`: retry."),
    "504": _error("`upstream_timeout`."),
}
_SESSION_ERRORS = {k: _TURN_ERRORS[k] for k in ("400", "401", "404")}


def _op(op_id: str, summary: str, responses: dict[str, Any], *, tags: list[str], description: str = "",
        body: dict[str, Any] | None = None, params: list[dict[str, Any]] | None = None,
        public: bool = False, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": tags, "responses": responses}
    if description:
        op["description"] = description
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if public:
        op["security"] = []
    op.update(extra)
    return op


_WS_DESCRIPTION = (
    "Upgrade to a WebSocket (`Upgrade: websocket`). Client frames: `WsClientFrame` (`message`, `cancel`, "
    "`resume` {turn_id, last_event_id}, `ping`); server frames: `Event` objects, `{\"type\":\"ping\"}` "
    "heartbeats, `{\"type\":\"pong\"}`, `{\"type\":\"no_active_turn\"}` after a resume with nothing to "
    "resume, and `error` objects without `id` for refused frames. `?session_id=` binds the connection "
    "to an existing session (else the first message creates one). Browsers authenticate with the "
    "subprotocols `agent` + `bearer.<key>` or `?ticket=` from `POST /ws-ticket`.")

PATHS: dict[str, dict[str, Any]] = {
    "/agent": {"post": _op("runTurn", "Run one turn and return the whole answer", {
        "200": _json(_ref("TurnResult"), "The answer."), **_TURN_ERRORS}, tags=["turns"], body=_ref("TurnRequest"))},
    "/agent/stream": {"post": _op("streamTurn", "Run one turn, streamed as Server-Sent Events", {
        "200": _SSE, **_TURN_ERRORS}, tags=["turns"], body=_ref("TurnRequest"),
        description="Errors before the first event are HTTP statuses with a JSON body; after it they "
                    "arrive as an `error` event. Resume with `GET /sessions/{session_id}/stream`.")},
    "/agent/ws": {"get": _op("agentWebSocket", "Many turns over one WebSocket", {
        "101": {"description": "Switching Protocols: the WebSocket is open.",
                "content": {"application/json": {"schema": _ref("Event")}}},
        "401": _error("An API key or ticket is required."), "403": _error("`forbidden_origin`."),
        "429": _error("Too many open streams.")},
        tags=["turns"], description=_WS_DESCRIPTION, **{"x-websocket": True},
        params=[{"name": "session_id", "in": "query", "required": False, "schema": _ID},
                {"name": "ticket", "in": "query", "required": False, "schema": _STRING}])},
    "/sessions/{session_id}": {
        "get": _op("getSession", "A session: history, usage, cost and turn records",
                   {"200": _json(_ref("SessionView"), "The session."), **_SESSION_ERRORS},
                   tags=["sessions"], params=[_SESSION_ID]),
        "delete": _op("deleteSession", "Delete a session and its history",
                      {"204": {"description": "Deleted.", "headers": {
                          "X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}}, **_SESSION_ERRORS},
                      tags=["sessions"], params=[_SESSION_ID]),
    },
    "/sessions/{session_id}/stream": {"get": _op(
        "resumeStream", "Resume a turn's event stream after `Last-Event-ID`",
        {"200": _SSE, "204": {"description": "Nothing to resume (no recent turn, or the client is up to date).",
                              "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}},
         **_SESSION_ERRORS},
        tags=["sessions"], params=[
            _SESSION_ID,
            {"name": "Last-Event-ID", "in": "header", "required": False, "schema": _STRING},
            {"name": "last_event_id", "in": "query", "required": False, "schema": _STRING,
             "description": "The same as the header, for clients that cannot set headers."}])},
    "/sessions/{session_id}/cancel": {"post": _op(
        "cancelTurn", "Cancel the session's running turn (wherever it runs)",
        {"202": _json(_ref("CancelResult"), "Cancelled; the stream ends with `turn_end` (cancelled: true)."),
         "200": _json(_ref("CancelResult"), "No turn was running."), **_SESSION_ERRORS},
        tags=["sessions"], params=[_SESSION_ID])},
    "/ws-ticket": {"post": _op("wsTicket", "A single-use ticket for a browser WebSocket (`?ticket=`)", {
        "200": _json(_ref("WsTicket"), "The ticket (valid about a minute)."),
        "401": _error("An API key is required.")}, tags=["auth"])},
    "/api/chat": {"post": _op("uiChat", "Vercel AI SDK `useChat` endpoint (UI message stream)", {
        "200": _UI_SSE, **_TURN_ERRORS}, tags=["ai-sdk"], body=_ref("UIChatRequest"))},
    "/api/chat/{chat_id}/stream": {"get": _op("uiChatResume", "Resume a `useChat` stream", {
        "200": _UI_SSE, "204": {"description": "No running turn.", "headers": {
            "X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}}, **_SESSION_ERRORS},
        tags=["ai-sdk"], params=[{"name": "chat_id", "in": "path", "required": True,
                                  "schema": {"type": "string", "minLength": 1, "maxLength": 256}}])},
    "/api/chat/ws": {"get": _op("uiChatWebSocket", "Vercel AI SDK `WebSocketChatTransport`", {
        "101": {"description": "Switching Protocols: frames `send`/`resume`/`abort` in, `start`/`chunk`/`end`/"
                               "`error`/`no-active` out (see server/transports/ai_sdk_ws.py)."},
        "401": _error("An API key or ticket is required."), "403": _error("`forbidden_origin`.")},
        tags=["ai-sdk"], **{"x-websocket": True})},
    "/health": {"get": _op("health", "Liveness; says whether a real model is behind the server", {
        "200": _json(_ref("Health"), "The process answers.")}, tags=["operations"], public=True)},
    "/ready": {"get": _op("ready", "Readiness: the store answers and this worker takes turns", {
        "200": _json(_ref("Ready"), "Ready."), "503": _json(_ref("Ready"), "Not ready (draining or no store).")},
        tags=["operations"], public=True)},
    "/metrics": {"get": _op("metrics", "Prometheus metrics (all workers)", {
        "200": {"description": "Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}, tags=["operations"])},
    "/openapi.json": {"get": _op("openapi", "This document", {
        "200": {"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {"type": "object"}}}}},
        tags=["operations"], public=True)},
    "/": {"get": _op("chatPage", "The built-in chat page (HTML)", {
        "200": {"description": "The page; it talks to `WS /agent/ws`.",
                "content": {"text/html": {"schema": {"type": "string"}}}}}, tags=["ui"], public=True)},
    "/static/{path}": {"get": _op("chatPageAsset", "The chat page's script and stylesheet", {
        "200": {"description": "The file.", "content": {"text/javascript": {"schema": {"type": "string"}},
                                                        "text/css": {"schema": {"type": "string"}}}},
        "404": {"description": "No such file."}}, tags=["ui"], public=True,
        params=[{"name": "path", "in": "path", "required": True, "schema": _STRING}])},
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Claude agent server",
        "version": VERSION,
        "description": "An agent on the Anthropic Messages API with server-side sessions, streamed over "
                       "JSON, Server-Sent Events and WebSocket. Every response carries `X-Request-ID` "
                       "(the client's, if it sent a valid one: 1-128 of `[A-Za-z0-9._:/+=@-]`).",
    },
    "servers": [{"url": "/"}],
    "tags": [{"name": n} for n in ("turns", "sessions", "auth", "ai-sdk", "operations", "ui")],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "headers": {"X-Request-ID": {"description": "The request id (echoed, or generated), also in the logs.",
                                     "schema": _STRING}},
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                           "description": "A key from AGENT_API_KEYS (none needed on a "
                                                          "keyless local server)."}},
    },
    "security": [{"bearerAuth": []}, {}],
}


async def openapi_endpoint(request: Request) -> Response:
    return JSONResponse(SPEC, headers={"Cache-Control": "no-cache"})
