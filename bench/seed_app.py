"""The comparison point: a minimal agent server written the way the seed was.

The SDK's `messages.stream()` helper, one SSE frame per text token built with json.dumps,
history in a process-local dict, no Redis, no event log, no locks. Only the benchmark uses
it: `uvicorn bench.seed_app:app --loop uvloop --http httptools` with ANTHROPIC_BASE_URL and
ANTHROPIC_API_KEY pointing at the fake.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import anthropic
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

MODEL = os.environ.get("DEFAULT_MODEL", "claude-sonnet-4-5")
MAX_TOKENS = 4096

client = anthropic.AsyncAnthropic()
sessions: dict[str, list[dict[str, Any]]] = {}


def _history(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    session_id = body.get("session_id") or uuid.uuid4().hex
    history = sessions.setdefault(session_id, [])
    history.append({"role": "user", "content": body["message"]})
    return session_id, history


async def agent_stream(request: Request) -> StreamingResponse:
    body = await request.json()
    session_id, history = _history(body)

    async def events():
        async with client.messages.stream(model=MODEL, max_tokens=MAX_TOKENS, messages=history) as stream:
            async for text in stream.text_stream:
                yield f"data: {json.dumps({'type': 'text_delta', 'text': text})}\n\n"
            final = await stream.get_final_message()
        history.append({"role": "assistant", "content": [b.model_dump() for b in final.content]})
        yield f"data: {json.dumps({'type': 'done', 'session_id': session_id})}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"X-Session-ID": session_id})


async def agent(request: Request) -> JSONResponse:
    body = await request.json()
    session_id, history = _history(body)
    message = await client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=history)
    history.append({"role": "assistant", "content": [b.model_dump() for b in message.content]})
    text = "".join(b.text for b in message.content if b.type == "text")
    return JSONResponse({"session_id": session_id, "text": text,
                         "usage": message.usage.model_dump()})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "sessions": len(sessions)})


app = Starlette(routes=[
    Route("/agent/stream", agent_stream, methods=["POST"]),
    Route("/agent", agent, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/ready", health, methods=["GET"]),
])
