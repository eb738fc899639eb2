"""`GET /openapi.json`: valid OpenAPI 3.1, complete (every route of the app), and true (real
responses and stream events validate against its schemas)."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from starlette.routing import Mount, Route, WebSocketRoute

from server.app import create_app
from server.config import Settings
from server.openapi import SPEC

from .harness import Server


def check(name: str, instance: object) -> None:
    """Validate against `#/components/schemas/<name>` of the served document."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}
    errors = sorted(Draft202012Validator(schema).iter_errors(instance), key=str)
    assert not errors, f"{name}: {errors[0].message} in {json.dumps(instance)[:400]}"


def test_the_document_is_valid_openapi_3_1():
    validate(SPEC)  # raises on any violation of the OpenAPI 3.1 schema (and bad $refs)
    for name, schema in SPEC["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
    ids = [op["operationId"] for item in SPEC["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), "operationIds are unique"


def test_every_route_is_described_and_nothing_else():
    app = create_app(Settings.from_env({}))
    documented = {(path, method) for path, item in SPEC["paths"].items() for method in item}
    served = set()
    for route in app.routes:
        if isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":  # Starlette adds HEAD to every GET
                    served.add((route.path, method.lower()))
        elif isinstance(route, WebSocketRoute):
            served.add((route.path, "get"))
            assert SPEC["paths"][route.path]["get"].get("x-websocket") is True, route.path
        elif isinstance(route, Mount):
            served.add((route.path + "/{path}", "get"))
        else:  # pragma: no cover - a new kind of route needs describing here
            pytest.fail(f"unknown route type {route!r}")
    assert served - documented == set(), "routes missing from server/openapi.py"
    assert documented - served == set(), "documented operations the app does not serve"
    for path, item in SPEC["paths"].items():
        params = {p["name"] for op in item.values() for p in op.get("parameters", []) if p["in"] == "path"}
        assert params == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}, path


async def test_real_responses_match_the_schemas(shared_server: Server, upstream):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = await client.get("/openapi.json")
        assert r.status_code == 200 and r.json() == json.loads(json.dumps(SPEC))
        assert r.headers["x-request-id"]
        check("Health", (await client.get("/health")).json())
        check("Ready", (await client.get("/ready")).json())

        upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "1+2"}}]},
                        {"text": "It is 3."})
        r = await client.post("/agent", json={"message": "1+2?", "max_tokens": 100})
        assert r.status_code == 200
        result = r.json()
        check("TurnResult", result)
        assert result["tool_calls"] and result["tool_calls"][0]["output"] == "3"
        session_id = result["session_id"]

        upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "2*5"}}]},
                        {"text": "Ten."})
        events = []
        async with aconnect_sse(client, "POST", "/agent/stream",
                                json={"message": "2*5?", "session_id": session_id}) as source:
            async for sse in source.aiter_sse():
                events.append(json.loads(sse.data))
        assert {e["type"] for e in events} >= {"turn_start", "text_delta", "tool_call", "tool_input",
                                                "tool_result", "turn_end"}
        for event in events:
            check("Event", event)

        upstream.script({"text": "one two three four five", "error_after": 3})
        async with aconnect_sse(client, "POST", "/agent/stream",
                                json={"message": "break", "session_id": session_id}) as source:
            broken = [json.loads(sse.data) async for sse in source.aiter_sse()]
        assert broken[-1]["type"] == "error"
        for event in broken:
            check("Event", event)

        check("SessionView", (await client.get(f"/sessions/{session_id}")).json())
        check("CancelResult", (await client.post(f"/sessions/{session_id}/cancel")).json())
        r = await client.post("/ws-ticket")
        assert r.status_code == 200
        check("WsTicket", r.json())

        for response in (await client.get("/sessions/AAAAAAAAAAAAAAAAAAAAAA"),
                         await client.post("/agent", content=b"{oops"),
                         await client.post("/agent", json={"message": "x", "model": "no-such-model"})):
            assert response.status_code in (400, 404)
            check("ErrorResponse", response.json())

    async with websockets.connect(f"{shared_server.ws_url}/agent/ws?session_id={session_id}") as ws:
        frame = {"type": "message", "message": "over the socket"}
        check("WsClientFrame", frame)
        await ws.send(json.dumps(frame))
        while True:
            event = json.loads(await ws.recv())
            if event["type"] in ("ping", "pong"):
                continue
            check("Event", event)
            if event["type"] in ("turn_end", "error"):
                break
        await ws.send(json.dumps({"type": "dance"}))
        refused = json.loads(await ws.recv())
        assert refused["type"] == "error" and "id" not in refused
        check("Event", refused)


# -- issue #16: documents, thinking, server tools, citations, finish --------------------------------
PDF = "JVBERi0xLjQKJeLjz9MK"  # (the schema does not decode; the server does: tests/test_documents.py)


def test_request_schema_takes_documents_thinking_and_effort():
    check("TurnRequest", {"message": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
         "title": "Report", "context": "Q3", "citations": {"enabled": True}},
        {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
        {"type": "text", "text": "Summarize."}],
        "thinking": {"type": "enabled", "budget_tokens": 2048, "display": "omitted"}, "effort": "xhigh"})
    for thinking in ({"type": "adaptive"}, {"type": "adaptive", "display": "summarized"}, {"type": "disabled"},
                     {"type": "between_tools"}):
        check("TurnRequest", {"message": "hi", "thinking": thinking})
    schema = {"$ref": "#/components/schemas/TurnRequest", "components": SPEC["components"]}
    for bad in ({"thinking": {"type": "enabled"}}, {"thinking": {"type": "enabled", "budget_tokens": 100}},
                {"thinking": {"type": "adaptive", "budget_tokens": 2048}}, {"effort": "extreme"},
                {"message": [{"type": "document", "source": {"type": "url", "url": "http://x.example/a.pdf"}}]}):
        assert not Draft202012Validator(schema).is_valid({"message": "hi", **bad}), bad


def test_new_event_shapes_match_the_schema():
    """The event vocabulary of docs (design of issue #16), each example as the engine sends it."""
    common = {"id": "T:1"}
    for event in [
        {"type": "thinking_delta", "thinking": "Let me see."},
        {"type": "citation", "citation": {"type": "char_location", "cited_text": "blue", "document_index": 0,
                                          "document_title": None, "start_char_index": 0, "end_char_index": 4}},
        {"type": "tool_call", "tool_use_id": "srvtoolu_1", "name": "web_search", "server": True},
        {"type": "tool_input", "tool_use_id": "srvtoolu_1", "name": "web_search", "input": {"query": "sky"},
         "valid": True, "server": True},
        {"type": "tool_result", "tool_use_id": "srvtoolu_1", "name": "web_search", "is_error": False, "server": True,
         "result_type": "web_search_tool_result", "output": [{"type": "web_search_result", "url": "https://x"}]},
        {"type": "tool_result", "tool_use_id": "srvtoolu_2", "name": "web_fetch", "is_error": True, "server": True,
         "result_type": "web_fetch_tool_result", "error": {"type": "web_fetch_tool_result_error",
                                                           "error_code": "url_not_accessible"}},
        {"type": "turn_end", "session_id": "S", "turn_id": "T", "stop_reason": "refusal", "finish": "refused",
         "truncated": False, "cancelled": False, "text": "", "usage": {
             "input_tokens": 1, "output_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
             "thinking_tokens": 1, "web_search_requests": 1},
         "estimated_cost_usd": 0.01, "model": "m", "model_calls": 1, "request_id": None, "request_ids": [],
         "stop_details": {"type": "refusal", "category": "cyber"}},
        {"type": "turn_end", "session_id": "S", "turn_id": "T", "stop_reason": "stop_sequence", "finish": "complete",
         "stop_sequence": "END", "truncated": False, "cancelled": False, "text": "x", "usage": {
             "input_tokens": 1, "output_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
         "estimated_cost_usd": 0.0, "model": "m"},
    ]:
        check("Event", {**event, **common})
    schema = {"$ref": "#/components/schemas/Event", "components": SPEC["components"]}
    no_finish = {"type": "turn_end", "id": "T:2", "session_id": "S", "turn_id": "T", "stop_reason": "end_turn",
                 "text": "", "usage": {k: 0 for k in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                                                      "cache_read_input_tokens")},
                 "estimated_cost_usd": 0, "model": "m"}
    assert not Draft202012Validator(schema).is_valid(no_finish)
    assert not Draft202012Validator(schema).is_valid({"type": "turn_end", **no_finish, "finish": "done"})


SEARCH_ANSWER = {"blocks": [
    {"type": "thinking", "thinking": "I should search for this."},
    {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {"query": "sky colour"}},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [
        {"type": "web_search_result", "url": "https://example.com/sky", "title": "Sky", "encrypted_content": "enc",
         "page_age": None}]},
    {"type": "text", "text": "The sky is blue.", "citations": [
        {"type": "web_search_result_location", "url": "https://example.com/sky", "title": "Sky",
         "encrypted_index": "idx", "cited_text": "The sky is blue."}]},
], "stop_reason": "end_turn"}


async def test_thinking_server_tool_and_citation_events_match_the_schemas(start_server, upstream):
    server = start_server(SERVER_TOOLS="web_search", MAX_OUTPUT_TOKENS="8192")
    body = {"message": "What colour is the sky?", "thinking": {"type": "enabled", "budget_tokens": 1024}}
    check("TurnRequest", body)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        upstream.script(SEARCH_ANSWER)
        async with aconnect_sse(client, "POST", "/agent/stream", json=body) as source:
            events = [json.loads(sse.data) async for sse in source.aiter_sse()]
        for event in events:
            check("Event", event)
        types = [e["type"] for e in events]
        assert {"thinking_delta", "citation", "tool_call", "tool_input", "tool_result", "turn_end"} <= set(types)
        assert all(e.get("server") is True for e in events if e["type"].startswith("tool_"))
        assert events[-1]["finish"] == "complete"

        upstream.script(SEARCH_ANSWER)
        r = await client.post("/agent", json={**body, "session_id": events[-1]["session_id"]})
        assert r.status_code == 200, r.text
        result = r.json()
        check("TurnResult", result)
        assert result["thinking"] == "I should search for this." and len(result["citations"]) == 1
        assert result["tool_calls"][0]["server"] is True
