"""Plain JSON endpoints: `POST /agent`, the session resources, health and readiness."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import sessions
from ..security import principal_of
from ..engine import Engine, valid_session_id
from ..errors import ApiError, status_of
from ..requests import parse_json_body, parse_turn_request


# The events of a turn that waits for the client (or a person): kind of answer it waits for.
WAITS = {"tool_approval_request": "approval", "client_tool_call": "client"}


def engine_of(request: Any) -> Engine:
    return request.app.state.engine


def error_event_response(event: dict[str, Any], session_id: str, turn_id: str) -> JSONResponse:
    """A turn's `error` event, answered before anything was streamed: its HTTP status and body."""
    error = {k: v for k, v in event.items() if k not in ("type", "id")}
    headers = ApiError(error["code"], retry_after=error.get("retry_after")).headers()
    return JSONResponse({"error": error, "session_id": session_id, "turn_id": turn_id},
                        status_code=status_of(error["code"]), headers=headers)


async def agent(request: Request) -> Response:
    """Run one turn and answer with the whole result."""
    engine = engine_of(request)
    req = parse_turn_request(parse_json_body(await request.body()), engine.settings)
    handle = await engine.start(req, principal_of(request))
    calls: dict[str, dict[str, Any]] = {}  # (the tool calls' inputs and results, by id)
    waiting: dict[str, dict[str, Any]] = {}  # the calls the turn waits for (approval, client tool)
    thinking: list[str] = []
    citations: list[Any] = []
    final: dict[str, Any] | None = None
    previous = ""  # (the type of the event before: thinking blocks apart are joined by a blank line)
    async for batch in engine.follow(handle.session_id, handle.turn_id):
        for event in batch:
            if event.type == "thinking_delta":
                if thinking and previous != "thinking_delta":
                    thinking.append("\n\n")
                thinking.append(json.loads(event.data)["thinking"])
            previous = event.type
            if event.terminal:
                final = json.loads(event.data)
            elif event.type in ("tool_input", "tool_result"):
                e = json.loads(event.data)
                call = calls.setdefault(e["tool_use_id"], {"tool_use_id": e["tool_use_id"], "name": e["name"]})
                if e.get("server"):
                    call["server"] = True  # run by the API (web search, code execution...)
                if e["type"] == "tool_input":
                    call["input"] = e["input"]
                else:
                    call["is_error"] = e["is_error"]
                    call["output" if not e["is_error"] else "error"] = e.get("output", e.get("error"))
            elif event.type == "citation":
                citations.append(json.loads(event.data)["citation"])
            elif event.type in WAITS:
                e = json.loads(event.data)
                waiting[e["tool_use_id"]] = {"tool_use_id": e["tool_use_id"], "name": e["name"], "input": e["input"],
                                             "kind": WAITS[event.type], "timeout_s": e["timeout_s"]}
                if set(e["pending"]) <= set(waiting):
                    # The turn waits (on the server) for answers this client must send: say so now.
                    return JSONResponse({"session_id": handle.session_id, "turn_id": handle.turn_id,
                                         "status": "waiting_for_tools", "pending": list(waiting.values()),
                                         "tool_calls": list(calls.values())}, status_code=202)
    if final is None:  # the follow ended without a terminal event: the server is stopping
        raise ApiError("server_restarting")
    if final["type"] == "error":
        return error_event_response(final, handle.session_id, handle.turn_id)
    answer = {k: v for k, v in final.items() if k not in ("type", "id")} | {"tool_calls": list(calls.values())}
    if thinking:
        answer["thinking"] = "".join(thinking)
    if citations:
        answer["citations"] = citations
    return JSONResponse(answer)


async def tool_approval(request: Request) -> Response:
    """`POST /sessions/{id}/tool-approvals`: approve or deny a tool call the turn waits for."""
    return await _answer_tool(request, ("tool_use_id", "approved", "reason"))


async def tool_result(request: Request) -> Response:
    """`POST /sessions/{id}/tool-results`: the result of a client tool call the turn waits for."""
    return await _answer_tool(request, ("tool_use_id", "output", "is_error"))


async def _answer_tool(request: Request, fields: tuple[str, ...]) -> Response:
    session_id = valid_session_id(request.path_params["session_id"])
    body = _fields(parse_json_body(await request.body()), fields, required=fields[1:2])
    turn_id = await engine_of(request).answer_tools(session_id, principal_of(request), [body])
    return JSONResponse({"session_id": session_id, "turn_id": turn_id, "tool_use_id": body["tool_use_id"]},
                        status_code=202)


def _fields(given: Any, allowed: tuple[str, ...], required: tuple[str, ...] = (), what: str = "field") -> Any:
    """`given` (a JSON body, or query parameters) when it names only `allowed` fields and has
    the `required` ones; else 400 naming the first field at fault."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ApiError("invalid_request", f"Unknown {what}(s): {', '.join(unknown)}; expected {', '.join(allowed)}.",
                       field=unknown[0])
    for name in required:
        if name not in given:
            raise ApiError("invalid_request", f"`{name}` is required.", field=name)
    return given


async def get_session(request: Request) -> Response:
    """The session's summary (as `GET /sessions` lists it), its history and turn records."""
    session_id = valid_session_id(request.path_params["session_id"])
    view = await engine_of(request).session(session_id, principal_of(request))
    meta = view.meta
    summary = {"text": meta.summary, "covers_messages": meta.summary_upto} if meta.summary else None
    return JSONResponse({**sessions.summary(session_id, meta), "messages": view.history,
                         "turn_records": view.turns, "summary": summary})


async def list_sessions(request: Request) -> Response:
    """`GET /sessions?limit=&cursor=`: the caller's sessions, newest activity first."""
    params = _fields(request.query_params, ("limit", "cursor"), what="parameter")
    limit = sessions.page_limit(params.get("limit"))
    page = await engine_of(request).list_sessions(principal_of(request), limit,
                                                  sessions.decode_cursor(params.get("cursor")))
    return JSONResponse({"sessions": [sessions.summary(sid, meta) for sid, meta in page.sessions],
                         "next_cursor": sessions.encode_cursor(page.next) if page.next else None})


async def rename_session(request: Request) -> Response:
    """`PATCH /sessions/{id}` `{"title": ...}`: the owner's title (replaces any other, for good)."""
    session_id = valid_session_id(request.path_params["session_id"])
    body = _fields(parse_json_body(await request.body()), ("title",), required=("title",))
    meta = await engine_of(request).rename(session_id, principal_of(request), sessions.user_title(body["title"]))
    return JSONResponse(sessions.summary(session_id, meta))


async def delete_session(request: Request) -> Response:
    session_id = valid_session_id(request.path_params["session_id"])
    await engine_of(request).delete(session_id, principal_of(request))
    return Response(status_code=204)


async def cancel_session(request: Request) -> Response:
    session_id = valid_session_id(request.path_params["session_id"])
    turn_id = await engine_of(request).cancel(session_id, principal_of(request))
    return JSONResponse({"session_id": session_id, "cancelled_turn_id": turn_id}, status_code=202 if turn_id else 200)


async def health(request: Request) -> Response:
    """Liveness: the process answers. Says loudly whether a real model is behind it."""
    settings = request.app.state.settings
    return JSONResponse({"status": "ok", "upstream": "offline" if settings.offline else "anthropic",
                         "offline_model": settings.offline, "store": "redis" if settings.redis_url else "memory",
                         "accepting_turns": engine_of(request).accepting})


async def ready(request: Request) -> Response:
    """Readiness: the store answers and this worker still takes turns. MCP servers' states are
    only reported: a server that is down does not make the worker unready (its tools answer errors)."""
    engine = engine_of(request)
    store_ok, accepting = await engine.store.ping(), engine.accepting
    ok = store_ok and accepting
    body: dict[str, Any] = {"status": "ready" if ok else "not_ready", "store": store_ok, "accepting_turns": accepting}
    if engine.mcp_servers is not None:
        body["mcp"] = engine.mcp_servers.states()
    return JSONResponse(body, status_code=200 if ok else 503)
