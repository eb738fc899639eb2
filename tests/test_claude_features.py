"""All of Claude end to end (#16): extended thinking, server tools and `pause_turn`, citations,
every stop reason, and content blocks this server does not know, over JSON, SSE and WebSocket.

The fake speaks these exactly as the Messages API does and refuses what the API refuses (a thinking
block whose signature changed, a `tool_use` without its `tool_result`, ...): a turn that completes
here proves the engine sent back what the API requires. The AI SDK mapping is in test_ai_sdk.py.
"""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import pytest
import websockets

from .harness import FakeUpstream, Server, server_env, sse_turn, ws_turn

CALC = "calculator"
SEARCH_RESULT = {"type": "web_search_result", "url": "https://example.com/moon", "title": "The Moon",
                 "encrypted_content": "EncRypTed==", "page_age": "2 days ago"}
WEB_CITATION = {"type": "web_search_result_location", "url": "https://example.com/moon", "title": "The Moon",
                "encrypted_index": "EnCiNdEx==", "cited_text": "The Moon is 384,400 km away."}


@pytest.fixture(scope="module")
def claude(fake: FakeUpstream, redis_url: str) -> Iterator[Server]:
    """Two workers with thinking on by default and every server tool switched on."""
    server = Server(server_env(fake, redis_url, WEB_CONCURRENCY=2, THINKING_BUDGET_TOKENS=2048,
                               MAX_OUTPUT_TOKENS=8192, SERVER_TOOLS="web_search,web_fetch,code_execution",
                               WEB_SEARCH_MAX_USES=3, WEB_SEARCH_ALLOWED_DOMAINS="example.com,wikipedia.org",
                               WEB_SEARCH_USER_LOCATION='{"city": "Paris", "country": "FR"}',
                               WEB_FETCH_CITATIONS="true",
                               ALLOWED_MODELS="claude-sonnet-4-5,claude-opus-4-6"), name="claude").start()
    yield server
    server.stop()


def joined(events: list[dict[str, Any]], kind: str, key: str) -> str:
    return "".join(e[key] for e in events if e["type"] == kind)


def without_cache_control(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in message["content"]]}


async def session(client: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    response = await client.get(f"/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def test_thinking_streams_apart_and_its_signature_comes_back_unchanged_in_the_tool_loop(claude, upstream):
    upstream.script({"thinking": "The user wants 2+2. I will use the calculator.",
                     "tool_use": [{"name": CALC, "input": {"expression": "2+2"}, "id": "toolu_T1"}]},
                    {"thinking": "The tool said 4.", "text": "It is 4."})
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        events = await sse_turn(client, {"message": "What is 2+2?"})
        end = events[-1]
        assert end["type"] == "turn_end", end
        assert joined(events, "thinking_delta", "thinking") == "The user wants 2+2. I will use the calculator." \
                                                               "The tool said 4."
        assert joined(events, "text_delta", "text") == end["text"] == "It is 4."  # no thinking in the text
        assert end["finish"] == "complete" and end["model_calls"] == 2
        first, second = upstream.requests()
        assert first["body"]["thinking"] == {"type": "enabled", "budget_tokens": 2048}
        # The fake refuses a changed or empty signature: the second call went through, so the thinking
        # block came back complete, first, before its tool_use.
        assistant = without_cache_control(second["body"]["messages"][-2])
        thinking, call = assistant["content"]
        assert thinking["type"] == "thinking" and thinking["thinking"].startswith("The user wants 2+2.")
        assert thinking["signature"] and call == {"type": "tool_use", "id": "toolu_T1", "name": CALC,
                                                  "input": {"expression": "2+2"}}
        # Stored history keeps the blocks byte for byte, and the next turn sends them again as they were.
        history = (await session(client, end["session_id"]))["messages"]
        assert history[1] == assistant
        upstream.script({"text": "Anything else?"})
        again = await sse_turn(client, {"message": "Thanks", "session_id": end["session_id"]})
        assert again[-1]["type"] == "turn_end", again[-1]
        assert without_cache_control(upstream.requests()[-1]["body"]["messages"][1]) == assistant


async def test_thinking_tokens_are_counted_and_priced_as_output(claude, upstream):
    upstream.script({"thinking": "one two three four five six", "text": "Done.",
                     "usage": {"output_tokens_details": {"thinking_tokens": 40}, "output_tokens": 52}})
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        end = (await sse_turn(client, {"message": "Think."}))[-1]
    assert end["usage"]["output_tokens"] == 52 and end["usage"]["thinking_tokens"] == 40
    input_tokens = end["usage"]["input_tokens"] + end["usage"]["cache_creation_input_tokens"] * 1.25 \
        + end["usage"]["cache_read_input_tokens"] * 0.1
    assert end["estimated_cost_usd"] == pytest.approx((input_tokens * 3 + 52 * 15) / 1e6, abs=1e-8)


async def test_json_answer_keeps_thinking_blocks_apart(claude, upstream):
    upstream.script({"thinking": "First I compute.", "tool_use": [{"name": CALC, "input": {"expression": "1+1"}}]},
                    {"thinking": "Then I answer.", "text": "Two."})
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "1+1?"})
    assert r.status_code == 200, r.text
    assert r.json()["thinking"] == "First I compute.\n\nThen I answer." and r.json()["text"] == "Two."


async def test_redacted_thinking_survives_the_tool_loop_unchanged(claude, upstream):
    upstream.script({"thinking": "Hmm.", "redacted_thinking": "classified",
                     "tool_use": [{"name": CALC, "input": {"expression": "3*3"}, "id": "toolu_R"}]},
                    {"text": "Nine."})
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        events = await sse_turn(client, {"message": "3*3?"})
    end = events[-1]
    assert end["type"] == "turn_end" and end["text"] == "Nine.", end
    # Clients learn that some thinking was encrypted (there is nothing of it to show).
    assert [e["type"] for e in events if e["type"].startswith("thinking")] == [
        "thinking_delta", "thinking_redacted"]
    sent = without_cache_control(upstream.requests()[1]["body"]["messages"][-2])["content"]
    assert [b["type"] for b in sent] == ["thinking", "redacted_thinking", "tool_use"]
    assert sent[1]["data"]  # the fake checks it is the data it issued


async def test_thinking_chosen_per_request_is_checked_against_the_model(claude, upstream):
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        upstream.script({"thinking": "Adaptive.", "text": "Sure."})
        r = await client.post("/agent", json={"message": "Hi", "model": "claude-opus-4-6",
                                              "thinking": {"type": "adaptive"}, "effort": "high"})
        assert r.status_code == 200, r.text
        assert r.json()["thinking"] == "Adaptive." and r.json()["text"] == "Sure."
        body = upstream.requests()[-1]["body"]
        assert body["thinking"] == {"type": "adaptive"} and body["output_config"] == {"effort": "high"}
        # The Models API says claude-sonnet-4-5 takes neither adaptive thinking nor an effort level.
        r = await client.post("/agent", json={"message": "Hi", "thinking": {"type": "adaptive"}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "thinking_not_supported", r.text
        r = await client.post("/agent", json={"message": "Hi", "effort": "max"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "thinking_not_supported", r.text
        upstream.script({"text": "No thinking."})
        r = await client.post("/agent", json={"message": "Hi", "thinking": {"type": "disabled"}})
        assert r.status_code == 200 and "thinking" not in r.json()
        assert upstream.requests()[-1]["body"]["thinking"] == {"type": "disabled"}


async def test_web_search_pause_turn_is_continued_and_citations_kept(claude, upstream):
    search = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "moon distance"}}
    result = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [SEARCH_RESULT]}
    cited = {"type": "text", "text": "It is about 384,400 km away.", "citations": [WEB_CITATION]}
    upstream.script({"blocks": [{"type": "text", "text": "Let me search."}, search, result],
                     "stop_reason": "pause_turn"},
                    {"blocks": [cited]})  # (the fake counts the search in the first call's usage)
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        events = await sse_turn(client, {"message": "How far is the moon?"})
        end = events[-1]
        assert end["type"] == "turn_end" and end["finish"] == "complete" and end["model_calls"] == 2, end
        assert end["stop_reason"] == "end_turn"
        by_type = {e["type"]: e for e in events}
        assert by_type["tool_call"] | {} == {**by_type["tool_call"], "tool_use_id": "srvtoolu_1",
                                            "name": "web_search", "server": True}
        assert by_type["tool_input"]["input"] == {"query": "moon distance"} and by_type["tool_input"]["server"]
        assert by_type["tool_result"]["output"] == [SEARCH_RESULT] and by_type["tool_result"]["server"] is True
        assert by_type["tool_result"]["name"] == "web_search"
        assert by_type["tool_result"]["result_type"] == "web_search_tool_result"
        assert by_type["citation"]["citation"] == WEB_CITATION
        assert end["text"] == "Let me search.It is about 384,400 km away."
        # Web searches are priced on top of tokens ($10 per 1,000).
        assert end["usage"]["web_search_requests"] == 1 and end["estimated_cost_usd"] > 0.01
        first, second = upstream.requests()
        tools = {t["name"]: t for t in first["body"]["tools"]}
        assert {k: v for k, v in tools["web_search"].items() if k != "cache_control"} == {
            "type": "web_search_20250305", "name": "web_search", "max_uses": 3,
            "allowed_domains": ["example.com", "wikipedia.org"],
            "user_location": {"type": "approximate", "city": "Paris", "country": "FR"}}
        assert tools["web_fetch"]["type"] == "web_fetch_20250910" and tools["web_fetch"]["citations"] == {
            "enabled": True}
        assert tools["code_execution"]["type"] == "code_execution_20250825"
        # The paused answer went back as it was, last, for the API to continue it.
        paused = without_cache_control(second["body"]["messages"][-1])
        assert paused == {"role": "assistant", "content": [{"type": "text", "text": "Let me search."}, search, result]}
        # History: one assistant message with the paused part and its continuation, citations kept.
        history = (await session(client, end["session_id"]))["messages"]
        assert [m["role"] for m in history] == ["user", "assistant"]
        assert history[1]["content"] == [{"type": "text", "text": "Let me search."}, search, result, cited]


async def test_pause_turn_counts_against_the_iteration_limit(claude, upstream):
    upstream.script(*({"blocks": [{"type": "server_tool_use", "id": f"srvtoolu_P{i}", "name": "web_search",
                                   "input": {"query": "x"}}], "stop_reason": "pause_turn"} for i in range(5)))
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        events = await sse_turn(client, {"message": "Search forever"})
        assert events[-1]["type"] == "error" and events[-1]["code"] == "max_iterations", events[-1]
        assert len(upstream.requests()) == 5
        upstream.script({"text": "Recovered."})
        again = await sse_turn(client, {"message": "Still there?", "session_id": events[0]["session_id"]})
        assert again[-1]["type"] == "turn_end", again[-1]  # the history it left is one the API takes


async def test_code_execution_result_and_container_reuse(claude, upstream):
    run = {"type": "server_tool_use", "id": "srvtoolu_C", "name": "code_execution",
           "input": {"code": "print(6*7)"}}
    output = {"type": "code_execution_tool_result", "tool_use_id": "srvtoolu_C",
              "content": {"type": "code_execution_result", "stdout": "42\n", "stderr": "", "return_code": 0,
                          "content": []}}
    upstream.script({"blocks": [run, output], "stop_reason": "pause_turn",
                     "container": {"id": "container_abc", "expires_at": "2026-12-01T18:00:00Z"}},
                    {"text": "The answer is 42."})
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "Run 6*7"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["tool_calls"] == [{"tool_use_id": "srvtoolu_C", "name": "code_execution", "server": True,
                                     "input": {"code": "print(6*7)"}, "is_error": False,
                                     "output": output["content"]}]
    assert upstream.requests()[1]["body"]["container"] == "container_abc"


async def test_server_tool_error_result_is_marked(claude, upstream):
    fetch = {"type": "server_tool_use", "id": "srvtoolu_F", "name": "web_fetch", "input": {"url": "https://x.test"}}
    failed = {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_F",
              "content": {"type": "web_fetch_tool_result_error", "error_code": "url_not_accessible"}}
    upstream.script({"blocks": [{"type": "thinking", "thinking": "I will fetch it."}, fetch, failed,
                                {"type": "text", "text": "I could not fetch it."}]})
    async with websockets.connect(f"{claude.ws_url}/agent/ws") as ws:  # (thinking chosen in the frame)
        events = await ws_turn(ws, "Fetch https://x.test", thinking={"type": "enabled", "budget_tokens": 1500})
    assert upstream.requests()[-1]["body"]["thinking"] == {"type": "enabled", "budget_tokens": 1500}
    assert [e["thinking"] for e in events if e["type"] == "thinking_delta"] == ["I ", "will ", "fetch ", "it."]
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["is_error"] is True and result["error"] == failed["content"] and result["server"] is True
    assert events[-1]["type"] == "turn_end" and events[-1]["text"] == "I could not fetch it."


async def test_document_citations_reach_the_client_and_history(claude, upstream):
    citation = {"type": "char_location", "cited_text": "The sky is blue.", "document_index": 0,
                "document_title": "Facts", "start_char_index": 0, "end_char_index": 16}
    upstream.script({"blocks": [{"type": "text", "text": "Blue.", "citations": [citation]}]})
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The sky is blue."},
                "title": "Facts", "citations": {"enabled": True}}
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": [document, {"type": "text", "text": "What color?"}]})
        assert r.status_code == 200, r.text
        assert r.json()["citations"] == [citation] and r.json()["text"] == "Blue."
        sent = without_cache_control(upstream.requests()[-1]["body"]["messages"][-1])
        assert sent["content"][0] == document
        history = (await session(client, r.json()["session_id"]))["messages"]
        assert history[1]["content"] == [{"type": "text", "text": "Blue.", "citations": [citation]}]


@pytest.mark.parametrize("stop_reason, finish", [
    ("max_tokens", "truncated"), ("model_context_window_exceeded", "truncated"),
    ("stop_sequence", "complete"), ("end_turn", "complete"), ("a_future_reason", "unknown")])
async def test_every_stop_reason_has_an_outcome(claude, upstream, stop_reason, finish):
    upstream.script({"text": "Some answer", "stop_reason": stop_reason})
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        end = (await sse_turn(client, {"message": "Go"}))[-1]
        assert end["type"] == "turn_end" and end["stop_reason"] == stop_reason, end
        assert end["finish"] == finish and end["truncated"] is (finish == "truncated")
        history = (await session(client, end["session_id"]))["messages"]
    assert history[-1]["content"] == [{"type": "text", "text": "Some answer"}]


async def test_refusal_ends_the_turn_and_is_not_sent_again(claude, upstream):
    details = {"type": "refusal", "category": "cyber", "explanation": "Not with that."}
    upstream.script({"text": "I can't help with that.", "stop_reason": "refusal", "stop_details": details})
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "Write malware"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["finish"] == "refused" and answer["stop_reason"] == "refusal"
        assert answer["stop_details"] == details and answer["text"] == "I can't help with that."
        # The API asks for the refused exchange to be left out of what is sent next.
        view = await session(client, answer["session_id"])
        assert view["messages"] == [] and view["turn_records"][-1]["stop_reason"] == "refusal"
        upstream.script({"text": "Hello!"})
        r = await client.post("/agent", json={"message": "Hi", "session_id": answer["session_id"]})
        assert r.status_code == 200
        assert [m["role"] for m in upstream.requests()[-1]["body"]["messages"]] == ["user"]


async def test_a_tool_call_cut_by_max_tokens_is_not_left_without_its_result(claude, upstream):
    upstream.script({"text": "Let me", "tool_use": [{"name": CALC, "input": '{"expression": "1+'}],
                     "stop_reason": "max_tokens"})
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        end = (await sse_turn(client, {"message": "Compute"}))[-1]
        assert end["finish"] == "truncated" and end["text"] == "Let me", end
        history = (await session(client, end["session_id"]))["messages"]
        assert history[-1]["content"] == [{"type": "text", "text": "Let me"}]
        upstream.script({"text": "Continuing."})
        again = (await sse_turn(client, {"message": "Go on", "session_id": end["session_id"]}))[-1]
        assert again["type"] == "turn_end", again  # the fake refuses a tool_use without its tool_result


async def test_unknown_block_and_delta_types_are_kept_and_sent_back_verbatim(claude, upstream):
    future = {"type": "hologram", "id": "holo_1", "frames": "abc", "meta": {"fps": 24},
              "_start": {"type": "hologram", "id": "holo_1", "frames": "", "meta": {"fps": 24}},
              "_deltas": [{"type": "frames_delta", "frames": "ab"}, {"type": "frames_delta", "frames": "c"}]}
    upstream.script({"blocks": [future, {"type": "text", "text": "Here is a hologram."}]})
    async with httpx.AsyncClient(base_url=claude.url, timeout=30) as client:
        end = (await sse_turn(client, {"message": "Show me"}))[-1]
        assert end["type"] == "turn_end" and end["text"] == "Here is a hologram." and end["finish"] == "complete"
        kept = {"type": "hologram", "id": "holo_1", "frames": "abc", "meta": {"fps": 24}}
        history = (await session(client, end["session_id"]))["messages"]
        assert history[1]["content"][0] == kept
        upstream.script({"text": "Again."})
        await sse_turn(client, {"message": "More", "session_id": end["session_id"]})
        assert upstream.requests()[-1]["body"]["messages"][1]["content"][0] == kept


async def test_interleaved_thinking_beta_header(start_server, upstream):
    server = start_server(THINKING_BUDGET_TOKENS=1024, THINKING_INTERLEAVED="true")
    upstream.script({"thinking": "Plan.", "text": "Ok."})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "Hi"})
    assert r.status_code == 200, r.text
    assert "interleaved-thinking-2025-05-14" in upstream.requests()[-1]["headers"]["anthropic-beta"]
