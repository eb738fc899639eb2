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
