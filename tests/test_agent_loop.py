"""The agent loop end to end: tools, tool events on every transport, caching, budgets,
images, structured output. Fake upstream, real Redis, real server processes."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import websockets

from .harness import sse_turn, strip_cache

CALC = "calculator"


def assert_valid_history(messages):
    assert messages[0]["role"] == "user"
    for a, b in zip(messages, messages[1:]):
        assert a["role"] != b["role"], "roles alternate"
    assert messages[-1]["role"] == "assistant"
    for i, m in enumerate(messages):
        for block in m["content"]:
            if block["type"] == "tool_use":
                results = {b.get("tool_use_id") for b in messages[i + 1]["content"]}
                assert block["id"] in results


async def test_calculator_end_to_end_over_sse(shared_server, upstream):
    upstream.script({"tool_use": [{"name": CALC, "input": {"expression": "2+3*4"}, "id": "toolu_A"}]})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        events = await sse_turn(client, {"message": "What is 2+3*4?"})
    kinds = [e["type"] for e in events]
    assert kinds[:5] == ["turn_start", "tool_call", "tool_input", "tool_result", "text_delta"]
    assert events[1] == {**events[1], "tool_use_id": "toolu_A", "name": CALC}
    assert events[2]["input"] == {"expression": "2+3*4"} and events[2]["valid"] is True
    assert events[3]["output"] == "14" and events[3]["is_error"] is False
    end = events[-1]
    assert end["type"] == "turn_end" and end["text"] == "The result is 14."
    assert end["model_calls"] == 2 and len(end["request_ids"]) == 2
    first, second = upstream.requests()
    # Usage is summed over both model calls: the answer alone is 4 text deltas.
    assert end["usage"]["output_tokens"] > 4 and end["usage"]["input_tokens"] > 0
    assert {t["name"] for t in first["body"]["tools"]} == {"calculator", "current_time"}
    # The result reached the model in the next call, paired with its tool_use.
    msgs = strip_cache(second["body"]["messages"])
    assert msgs[-2] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_A", "name": CALC, "input": {"expression": "2+3*4"}}]}
    assert msgs[-1] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_A", "content": "14"}]}


async def test_tool_events_over_websocket(shared_server, upstream):
    upstream.script({"tool_use": [{"name": CALC, "input": {"expression": "6*7"}}]})
    async with websockets.connect(f"{shared_server.ws_url}/agent/ws") as ws:
        await ws.send(json.dumps({"type": "message", "message": "6 times 7?"}))
        events = []
        while not events or events[-1]["type"] not in ("turn_end", "error"):
            e = json.loads(await ws.recv())
            if e["type"] != "ping":
                events.append(e)
    assert [e["type"] for e in events if e["type"].startswith("tool")] == ["tool_call", "tool_input", "tool_result"]
    assert events[-1]["text"] == "The result is 42."


async def test_bad_arguments_raising_tools_and_unknown_tools_are_played_back(shared_server, upstream):
    upstream.script({"tool_use": [
        {"name": CALC, "input": {"expr": "1+1"}, "id": "toolu_bad"},
        {"name": CALC, "input": {"expression": "1/0"}, "id": "toolu_raise"},
        {"name": "web_search", "input": {"q": "x"}, "id": "toolu_unknown"},
        {"name": CALC, "input": "{not json", "id": "toolu_json"},
    ]}, {"text": "Sorry, let me fix that."})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "try tools"})
    assert r.status_code == 200, r.text
    calls = {c["tool_use_id"]: c for c in r.json()["tool_calls"]}
    assert all(c["is_error"] for c in calls.values())
    assert "expression" in calls["toolu_bad"]["error"]
    assert "ZeroDivisionError" in calls["toolu_raise"]["error"]
    assert "unknown tool 'web_search'" in calls["toolu_unknown"]["error"]
    results = upstream.requests()[1]["body"]["messages"][-1]["content"]
    assert [b["tool_use_id"] for b in results] == ["toolu_bad", "toolu_raise", "toolu_unknown", "toolu_json"]
    assert all(b["is_error"] is True for b in results)
    assert "expression" in results[0]["content"]


async def test_two_tool_uses_get_two_matching_results(shared_server, upstream):
    upstream.script({"tool_use": [{"name": CALC, "input": {"expression": "1+1"}, "id": "toolu_1"},
                                  {"name": CALC, "input": {"expression": "2+2"}, "id": "toolu_2"}]},
                    {"text": "2 and 4."})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "two sums"})
    results = upstream.requests()[1]["body"]["messages"][-1]["content"]
    assert [(b["tool_use_id"], strip_cache([{"role": "u", "content": [b]}])[0]["content"][0]["content"])
            for b in results] == [("toolu_1", "2"), ("toolu_2", "4")]
    assert r.json()["text"] == "2 and 4."


async def test_iteration_cap_ends_with_max_iterations_and_a_valid_history(start_server, upstream):
    server = start_server(MAX_TOOL_ITERATIONS=2)
    upstream.script({"tool_use": [{"name": CALC, "input": {"expression": "1+1"}}], "times": 5})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "loop forever"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "max_iterations"
        sid = r.json()["session_id"]
        assert len(upstream.requests()) == 2
        history = (await client.get(f"/sessions/{sid}")).json()["messages"]
        assert_valid_history(history)
        upstream.reset()
        upstream.script({"text": "ok"})
        r = await client.post("/agent", json={"message": "next", "session_id": sid})
        assert r.status_code == 200
        assert_valid_history(strip_cache(upstream.requests()[0]["body"]["messages"]) + [
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}])


async def test_follow_up_on_another_worker_sends_tool_blocks_back_exactly(start_server, upstream):
    a = start_server(name="worker-a")
    b = start_server(name="worker-b")
    upstream.script({"tool_use": [{"name": CALC, "input": {"expression": "9-3"}, "id": "toolu_X"}]})
    async with httpx.AsyncClient(timeout=30) as client:
        first = (await client.post(a.url + "/agent", json={"message": "9-3?"})).json()
        upstream.script({"text": "Yes."})
        await client.post(b.url + "/agent", json={"message": "Sure?", "session_id": first["session_id"]})
    reqs = upstream.requests()
    turn1_final = strip_cache(reqs[1]["body"]["messages"]) + [
        {"role": "assistant", "content": [{"type": "text", "text": "The result is 6."}]}]
    assert strip_cache(reqs[2]["body"]["messages"])[:4] == turn1_final


async def test_cache_breakpoints_and_cache_usage(shared_server, upstream):
    upstream.script({"text": "one"}, {"text": "two"})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        first = (await client.post("/agent", json={"message": "hello"})).json()
        second = (await client.post("/agent", json={"message": "again", "session_id": first["session_id"]})).json()
        view = (await client.get(f"/sessions/{first['session_id']}")).json()
    body = upstream.requests()[1]["body"]
    marks = [b for b in body["system"] if "cache_control" in b]
    marks += [t for t in body["tools"] if "cache_control" in t]
    marks += [blk for m in body["messages"] if isinstance(m["content"], list) for blk in m["content"]
              if "cache_control" in blk]
    assert len(marks) <= 4
    assert "cache_control" in body["system"][-1] and "cache_control" in body["tools"][-1]
    assert "cache_control" in body["messages"][-1]["content"][-1]
    assert not any("cache_control" in blk for m in body["messages"][:-1] for blk in m["content"])
    assert first["usage"]["cache_creation_input_tokens"] > 0
    assert second["usage"]["cache_read_input_tokens"] > 0, "turn 2 reads what turn 1 wrote"
    total = view["usage"]
    assert total["cache_read_input_tokens"] == second["usage"]["cache_read_input_tokens"]
    assert view["estimated_cost_usd"] == pytest.approx(first["estimated_cost_usd"] + second["estimated_cost_usd"])


async def test_caching_can_be_turned_off(start_server, upstream):
    server = start_server(PROMPT_CACHING="false")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        await client.post("/agent", json={"message": "hello"})
    assert "cache_control" not in json.dumps(upstream.requests()[0]["body"])


async def test_context_window_sends_recent_turns_and_keeps_history(start_server, upstream):
    server = start_server(CONTEXT_TOKEN_BUDGET=1000, ENABLED_TOOLS="")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        sid = None
        for i in range(8):
            upstream.script({"text": f"answer {i} " + "z" * 800})
            body = {"message": f"question {i} " + "q" * 800}
            if sid:
                body["session_id"] = sid
            r = await client.post("/agent", json=body)
            assert r.status_code == 200, r.text
            sid = r.json()["session_id"]
        view = (await client.get(f"/sessions/{sid}")).json()
    assert len(view["messages"]) == 16, "stored history is never trimmed"
    last = upstream.requests()[-1]["body"]["messages"]
    assert len(last) < 15
    assert last[0]["role"] == "user" and last[-1]["content"][0]["text"].startswith("question 7")


async def test_session_token_budget_refuses_before_calling_the_api(start_server, upstream):
    server = start_server(SESSION_TOKEN_BUDGET=1500)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "hello"})
        assert r.status_code == 200
        sid = r.json()["session_id"]
        calls = len(upstream.requests())
        r = await client.post("/agent", json={"message": "x" * 6000, "session_id": sid})
        assert r.status_code == 403 and r.json()["error"]["code"] == "budget_exceeded"
        assert len(upstream.requests()) == calls, "refused before any API call"


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.mark.parametrize("block,status,code", [
    ({"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "AAAA"}}, 400, "invalid_image"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "!!!"}}, 400, "invalid_image"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                  "data": base64.b64encode(PNG).decode()}}, 400, "invalid_image"),
    ({"type": "image", "source": {"type": "url", "url": "http://example.com/a.png"}}, 400, "invalid_image"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                  "data": base64.b64encode(PNG + b"\x00" * 3000).decode()}}, 413, "image_too_large"),
])
async def test_image_validation(start_server, upstream, block, status, code):
    server = start_server(MAX_IMAGE_BYTES=2048, MAX_IMAGES=2)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": [{"type": "text", "text": "see"}, block]})
        assert r.status_code == status and r.json()["error"]["code"] == code
        ok = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                          "data": base64.b64encode(PNG).decode()}}
        r = await client.post("/agent", json={"message": [ok, ok, ok]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
        assert upstream.requests() == []
        r = await client.post("/agent", json={"message": [{"type": "text", "text": "see"}, ok]})
        assert r.status_code == 200
        sent = upstream.requests()[0]["body"]["messages"][0]["content"][1]
        assert sent["source"] == ok["source"]


async def test_max_tokens_is_capped_and_truncation_reported(start_server, upstream):
    server = start_server(MAX_OUTPUT_TOKENS=50)
    upstream.script({"text": "cut", "stop_reason": "max_tokens"})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = (await client.post("/agent", json={"message": "long", "max_tokens": 100000})).json()
    assert r["stop_reason"] == "max_tokens" and r["truncated"] is True
    assert upstream.requests()[0]["body"]["max_tokens"] == 50


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


async def test_structured_output_accepted(shared_server, upstream):
    upstream.script({"text": '{"name": "Ada", "age": 36}'})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        events = await sse_turn(client, {"message": "Who?", "response_schema": SCHEMA})
    assert events[-2] == {**events[-2], "type": "structured_output", "data": {"name": "Ada", "age": 36}}
    assert events[-1]["structured"] == {"name": "Ada", "age": 36}
    assert "JSON Schema" in json.dumps(upstream.requests()[0]["body"]["system"])


async def test_structured_output_retried_once_with_the_error(shared_server, upstream):
    upstream.script({"text": '{"name": "Ada", "age": "old"}'}, {"text": '{"name": "Ada", "age": 36}'})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = (await client.post("/agent", json={"message": "Who?", "response_schema": SCHEMA})).json()
        view = (await client.get(f"/sessions/{r['session_id']}")).json()
    assert r["structured"] == {"name": "Ada", "age": 36} and r["text"] == '{"name": "Ada", "age": 36}'
    retry = upstream.requests()[1]["body"]["messages"][-1]["content"][0]["text"]
    assert "'old' is not of type 'integer'" in retry and "age" in retry
    assert len(view["messages"]) == 2, "the failed try is not kept in the history"


async def test_structured_output_rejected_after_one_retry(shared_server, upstream):
    upstream.script({"text": "not json"}, {"text": '{"name": 1}'})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "Who?", "response_schema": SCHEMA})
        bad = await client.post("/agent", json={"message": "Who?", "response_schema": {"type": "nonsense"}})
    assert r.status_code == 502 and r.json()["error"]["code"] == "structured_output_invalid"
    assert len(upstream.requests()) == 2
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "response_schema"


async def test_an_empty_answer_keeps_the_history_sendable(shared_server, upstream):
    upstream.script({"text": ""}, {"text": "second"})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        first = (await client.post("/agent", json={"message": "say nothing"})).json()
        assert first["text"] == ""
        await client.post("/agent", json={"message": "now?", "session_id": first["session_id"]})
    sent = upstream.requests()[1]["body"]["messages"]
    assert all(m["content"] for m in sent), "no empty message is sent back"
    assert_valid_history(strip_cache(sent) + [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}])
