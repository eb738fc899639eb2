"""The fake's newer Messages API shapes (issue #16): thinking, redacted thinking, server tools and their
results, citations, stop details, usage details, the Models API, and what the fake refuses.

Wire shapes are asserted event by event as JSON; the SDK's own stream accumulator must build the same
message the non-streaming answer holds.
"""

from __future__ import annotations

import base64
import itertools
import json
import typing
from typing import Any, AsyncIterator

import anthropic
import httpx2
import pytest
import pytest_asyncio
from anthropic.types import Message, Model, ModelCapabilities

from server.fake_anthropic import FakeAnthropic, catalog, model, signing
from server.fake_anthropic.http import chunk

MODEL = "claude-test"
USER_HI = [{"role": "user", "content": "hi"}]
PDF = base64.b64encode(b"%PDF-1.4\n1 0 obj << /Type /Page >> endobj\n%%EOF").decode()
THINK = {"type": "enabled", "budget_tokens": 1024}
LOOP_RULE = (
    "When `thinking` is enabled, a final `assistant` message must start with a thinking block (preceeding the "
    "lastmost set of `tool_use` and `tool_result` blocks). We recommend you include thinking blocks from previous "
    "turns. To avoid this requirement, disable `thinking`. Please consult our documentation at "
    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
)
SEARCH_RESULT = {"type": "web_search_result", "url": "https://example.com/a", "title": "A", "encrypted_content": "EqQ",
                 "page_age": "2 days ago"}
WEB_CITATION = {"type": "web_search_result_location", "url": "https://example.com/a", "title": "A",
                "encrypted_index": "Eo8", "cited_text": "a fact"}
DOC_CITATION = {"type": "char_location", "cited_text": "x", "document_index": 0, "document_title": None,
                "start_char_index": 0, "end_char_index": 1, "file_id": None}
CONTAINER = {"id": "cntr_1", "expires_at": "2030-01-01T00:00:00Z"}
SERVER_BLOCKS = [
    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "facts"}},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [SEARCH_RESULT]},
    {"type": "server_tool_use", "id": "srvtoolu_2", "name": "web_fetch", "input": {"url": "https://example.com/a"}},
    {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_2",
     "content": {"type": "web_fetch_tool_result_error", "error_code": "url_not_accessible"}},
    {"type": "server_tool_use", "id": "srvtoolu_3", "name": "code_execution", "input": {"code": "print(1)"}},
    {"type": "code_execution_tool_result", "tool_use_id": "srvtoolu_3",
     "content": {"type": "code_execution_result", "stdout": "1\n", "stderr": "", "return_code": 0, "content": []}},
    {"type": "text", "text": "It is a fact.", "citations": [WEB_CITATION]},
]


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def client(fake: FakeAnthropic) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="test", base_url=fake.base_url, max_retries=0)


async def post(fake: FakeAnthropic, body: dict[str, Any], **headers: str) -> httpx2.Response:
    async with httpx2.AsyncClient(base_url=fake.base_url) as http:
        return await http.post("/v1/messages", json={"model": MODEL, "max_tokens": 2048, **body},
                               headers={"x-api-key": "test", **headers})


async def events(fake: FakeAnthropic, script: dict[str, Any], **body: Any) -> list[dict[str, Any]]:
    """The data of each SSE event the fake streams for ``script`` (event names checked against the types)."""
    fake.script(script)
    r = await post(fake, {"messages": USER_HI, "stream": True, **body})
    assert r.status_code == 200
    out = []
    for raw in r.text.strip().split("\n\n"):
        name, data = raw.split("\n")
        out.append(json.loads(data.removeprefix("data: ")))
        assert name == f"event: {out[-1]['type']}"
    return out


def deltas(index: int, *delta: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "content_block_delta", "index": index, "delta": d} for d in delta]


def block(index: int, start: dict[str, Any], *delta: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "content_block_start", "index": index, "content_block": start}, *deltas(index, *delta),
            {"type": "content_block_stop", "index": index}]


def framing(got: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """message_start/ping, the block events, message_delta (message_stop checked)."""
    assert [e["type"] for e in got[:2]] == ["message_start", "ping"] and got[-1] == {"type": "message_stop"}
    return got[:2], got[2:-2], got[-2]


# -- wire shapes ---------------------------------------------------------------------------


def test_plain_text_stream_bytes_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot path's bytes, pinned: a text answer streams exactly as before issue #16."""
    counter = itertools.count()
    monkeypatch.setattr(model, "new_id", lambda prefix: f"{prefix}{next(counter):024d}")
    usage = {"input_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    segments, drop = model.build_stream(model.plan_for({}, {"text": 'Hi, "you"\n'}, 0), MODEL, usage)
    expected = (
        'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_000000000000000000000000",'
        '"type":"message","role":"assistant","model":"claude-test","content":[],"stop_reason":null,'
        '"stop_sequence":null,"usage":{"input_tokens":5,"cache_creation_input_tokens":0,'
        '"cache_read_input_tokens":0,"output_tokens":1}}}\n\n'
        'event: ping\ndata: {"type":"ping"}\n\n'
        'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        '"content_block":{"type":"text","text":""}}\n\n'
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        '"delta":{"type":"text_delta","text":"Hi, "}}\n\n'
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        '"delta":{"type":"text_delta","text":"\\"you\\"\\n"}}\n\n'
        'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
        '"stop_sequence":null},"usage":{"output_tokens":2}}\n\n'
        'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    ).encode()
    assert (segments, drop) == ([(0.0, chunk(expected) + chunk(b""), 8)], False)


@pytest.mark.asyncio
async def test_thinking_and_redacted_thinking_stream(fake: FakeAnthropic) -> None:
    got = await events(fake, {"thinking": "Let me see.", "redacted_thinking": "hidden", "text": "Hi"})
    head, blocks, delta = framing(got)
    signature = signing.sign("Let me see.")
    data = signing.seal("hidden")
    assert blocks == [
        *block(0, {"type": "thinking", "thinking": "", "signature": ""},
               {"type": "thinking_delta", "thinking": "Let "}, {"type": "thinking_delta", "thinking": "me "},
               {"type": "thinking_delta", "thinking": "see."}, {"type": "signature_delta", "signature": signature}),
        *block(1, {"type": "redacted_thinking", "data": data}),
        *block(2, {"type": "text", "text": ""}, {"type": "text_delta", "text": "Hi"}),
    ]
    # output tokens: 3 thinking words + 1 redacted block + 1 text word
    assert delta == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                     "usage": {"output_tokens": 5, "output_tokens_details": {"thinking_tokens": 4}}}
    assert signing.signed("Let me see.", signature) and not signing.signed("Let me see!", signature)
    assert signing.sealed(data) and signing.seal(data) == data and not signing.sealed(data[:-4] + "AAAA")


@pytest.mark.asyncio
async def test_server_tool_blocks_and_citations_stream(fake: FakeAnthropic) -> None:
    got = await events(fake, {"blocks": SERVER_BLOCKS, "container": CONTAINER})
    _, blocks, delta = framing(got)

    def call(index: int, start: dict[str, Any], *parts: str) -> list[dict[str, Any]]:
        return block(index, {**start, "input": {}}, *({"type": "input_json_delta", "partial_json": p} for p in parts))

    assert blocks == [
        *call(0, SERVER_BLOCKS[0], "", '{"query"', ': "facts', '"}'),
        *block(1, SERVER_BLOCKS[1]),
        *call(2, SERVER_BLOCKS[2], "", '{"url": ', '"https:/', "/example", '.com/a"}'),
        *block(3, SERVER_BLOCKS[3]),
        *call(4, SERVER_BLOCKS[4], "", '{"code":', ' "print(', '1)"}'),
        *block(5, SERVER_BLOCKS[5]),
        *block(6, {"type": "text", "text": "", "citations": []}, {"type": "citations_delta", "citation": WEB_CITATION},
               {"type": "text_delta", "text": "It "}, {"type": "text_delta", "text": "is "},
               {"type": "text_delta", "text": "a "}, {"type": "text_delta", "text": "fact."}),
    ]
    assert delta == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None,
                  "container": CONTAINER},
        "usage": {"output_tokens": 17, "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 1}},
    }


@pytest.mark.asyncio
async def test_blocks_escape_hatch_stop_details_and_usage_override(fake: FakeAnthropic) -> None:
    future = {"type": "future_block", "value": 1, "_start": {"type": "future_block", "value": None},
              "_deltas": [{"type": "future_delta", "part": "v"}, {"type": "text_delta", "text": "x"}]}
    refusal = {"type": "refusal", "category": "cyber", "explanation": "no"}
    got = await events(fake, {"blocks": [{"type": "thinking", "thinking": "t", "signature": "bogus"}, future],
                              "stop_reason": "refusal", "stop_details": refusal, "stop_sequence": "END",
                              "usage": {"output_tokens": 9, "server_tool_use": {"web_search_requests": 3,
                                                                                 "web_fetch_requests": 0}}})
    _, blocks, delta = framing(got)
    assert blocks == [
        *block(0, {"type": "thinking", "thinking": "", "signature": ""}, {"type": "thinking_delta", "thinking": "t"},
               {"type": "signature_delta", "signature": "bogus"}),
        *block(1, {"type": "future_block", "value": None}, *future["_deltas"]),
    ]
    assert delta == {"type": "message_delta",
                     "delta": {"stop_reason": "refusal", "stop_sequence": "END", "stop_details": refusal},
                     "usage": {"output_tokens": 9, "output_tokens_details": {"thinking_tokens": 1},
                               "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 0}}}
    # the non-streaming form: the block without the escape hatch's keys
    fake.script({"blocks": [future]})
    body = (await post(fake, {"messages": USER_HI})).json()
    assert body["content"] == [{"type": "future_block", "value": 1}]
    assert "stop_details" not in body and "container" not in body


@pytest.mark.asyncio
async def test_display_omitted_thinking(fake: FakeAnthropic) -> None:
    got = await events(fake, {"thinking": "secret plan here", "text": "ok"},
                       thinking={**THINK, "display": "omitted"})
    _, blocks, delta = framing(got)
    signature = signing.sign("", "secret plan here")
    assert blocks[:3] == block(0, {"type": "thinking", "thinking": "", "signature": ""},
                               {"type": "signature_delta", "signature": signature})
    assert delta["usage"] == {"output_tokens": 4, "output_tokens_details": {"thinking_tokens": 3}}
    assert signing.signed("", signature) and signature != signing.sign("", "another plan")


# -- the SDK's view ------------------------------------------------------------------------

SCRIPTS = {
    "text": {"text": "Hello there, friend."},
    "thinking-tool": {"thinking": "I should call the tool.", "redacted_thinking": "r", "text": "Calling.",
                      "tool_use": [{"name": "weather", "input": {"city": "Paris"}, "id": "toolu_1"}]},
    "server-tools": {"blocks": SERVER_BLOCKS, "container": CONTAINER},
    "pause-turn": {"blocks": SERVER_BLOCKS[:1], "stop_reason": "pause_turn"},
    "refusal": {"thinking": "Hmm.", "stop_reason": "refusal",
                "stop_details": {"type": "refusal", "category": "bio", "explanation": None}},
    "document-citation": {"blocks": [{"type": "text", "text": "x is cited", "citations": [DOC_CITATION]}],
                          "stop_reason": "stop_sequence", "stop_sequence": "###"},
}


@pytest.mark.asyncio
@pytest.mark.parametrize("script", list(SCRIPTS.values()), ids=list(SCRIPTS))
async def test_sdk_accumulator_equals_non_streamed(fake: FakeAnthropic, script: dict[str, Any]) -> None:
    fake.script(script, script)
    sdk = client(fake)
    plain = await sdk.messages.create(model=MODEL, max_tokens=50, messages=USER_HI)  # type: ignore[arg-type]
    async with sdk.messages.stream(model=MODEL, max_tokens=50, messages=USER_HI) as stream:  # type: ignore[arg-type]
        streamed = Message.model_validate((await stream.get_final_message()).model_dump())
    assert streamed.model_dump(exclude={"id"}) == plain.model_dump(exclude={"id"})


@pytest.mark.asyncio
async def test_sdk_types_of_new_blocks(fake: FakeAnthropic) -> None:
    fake.script({"thinking": "a b", "redacted_thinking": "r", "blocks": None},
                {"blocks": SERVER_BLOCKS, "container": CONTAINER,
                 "stop_reason": "refusal", "stop_details": {"type": "refusal", "category": None, "explanation": None}})
    sdk = client(fake)
    first = await sdk.messages.create(model=MODEL, max_tokens=50, messages=USER_HI)  # type: ignore[arg-type]
    assert [type(b).__name__ for b in first.content] == ["ThinkingBlock", "RedactedThinkingBlock"]
    assert first.usage.output_tokens_details is not None and first.usage.output_tokens_details.thinking_tokens == 3
    second = await sdk.messages.create(model=MODEL, max_tokens=50, messages=USER_HI)  # type: ignore[arg-type]
    assert [type(b).__name__ for b in second.content] == [
        "ServerToolUseBlock", "WebSearchToolResultBlock", "ServerToolUseBlock", "WebFetchToolResultBlock",
        "ServerToolUseBlock", "CodeExecutionToolResultBlock", "TextBlock"]
    citation = second.content[6].citations[0]  # type: ignore[union-attr]
    assert type(citation).__name__ == "CitationsWebSearchResultLocation"
    assert second.usage.server_tool_use is not None and second.usage.server_tool_use.web_search_requests == 1
    assert second.container is not None and second.container.id == "cntr_1"
    assert second.stop_details is not None and second.stop_details.type == "refusal"


# -- what the fake refuses -------------------------------------------------------------------


def assistant(*content: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": list(content)}


def user(*content: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(content)}


def call(tool_id: str = "toolu_1", kind: str = "tool_use") -> dict[str, Any]:
    return {"type": kind, "id": tool_id, "name": "web_search" if kind == "server_tool_use" else "calc", "input": {}}


def result(tool_id: str = "toolu_1") -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": "42"}


def thought(text: str = "I will call calc.") -> dict[str, Any]:
    return {"type": "thinking", "thinking": text, "signature": signing.sign(text)}


def redacted(opaque: str = "r") -> dict[str, Any]:
    return {"type": "redacted_thinking", "data": signing.seal(opaque)}


def document(source: dict[str, Any]) -> dict[str, Any]:
    return {"type": "document", "source": source}


def text(value: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


EPHEMERAL = {"cache_control": {"type": "ephemeral"}}
Q = user(text("q"))
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "tool_use without result": (
        {"messages": [Q, assistant(call("toolu_1"), call("toolu_2")), user(result("toolu_2"), text("and?"))]},
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_1. Each "
        "`tool_use` block must have a corresponding `tool_result` block in the next message."),
    "tool_use followed by plain text": (
        {"messages": [Q, assistant(call()), {"role": "user", "content": "hm"}]},
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_1. Each "
        "`tool_use` block must have a corresponding `tool_result` block in the next message."),
    "tool_result unknown id": (
        {"messages": [Q, assistant(call()), user(result(), result("toolu_9"))]},
        "messages.2.content.1: unexpected `tool_use_id` found in `tool_result` blocks: toolu_9. Each `tool_result` "
        "block must have a corresponding `tool_use` block in the previous message."),
    "tool_result first": (
        {"messages": [user(result())]},
        "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_1. Each `tool_result` "
        "block must have a corresponding `tool_use` block in the previous message."),
    "empty signature": (
        {"messages": [Q, assistant({**thought(), "signature": ""}, text("a")), Q]},
        "messages.1.content.0: Invalid `signature` in `thinking` block"),
    "changed thinking": (
        {"messages": [Q, assistant({**thought(), "thinking": "I changed it."}, text("a")), Q]},
        "messages.1.content.0: Invalid `signature` in `thinking` block"),
    "missing signature": (
        {"messages": [Q, assistant({"type": "thinking", "thinking": "x"}, text("a")), Q]},
        "messages.1.content.0.thinking.signature: Field required"),
    "changed redacted data": (
        {"messages": [Q, assistant(thought(), {"type": "redacted_thinking", "data": "ZZZZ" + redacted()["data"]}), Q]},
        "messages.1.content.1: Invalid `data` in `redacted_thinking` block"),
    "loop without thinking": (
        {"thinking": THINK, "messages": [Q, assistant(text("Let me."), call()), user(result())]},
        f"messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `text`. {LOOP_RULE}"),
    "loop whose turn starts without thinking": (
        {"thinking": {"type": "adaptive"}, "messages": [
            Q, assistant(call()), user(result()), assistant(thought(), call("toolu_2")), user(result("toolu_2"))]},
        f"messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `tool_use`. {LOOP_RULE}"),
    "budget below 1024": (
        {"thinking": {"type": "enabled", "budget_tokens": 1000}, "messages": [Q]},
        "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"),
    "budget missing": (
        {"thinking": {"type": "enabled"}, "messages": [Q]}, "thinking.enabled.budget_tokens: Field required"),
    "budget not below max_tokens": (
        {"thinking": {"type": "enabled", "budget_tokens": 2048}, "messages": [Q]},
        "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at "
        "https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size"),
    "unknown thinking type": (
        {"thinking": {"type": "sometimes"}, "messages": [Q]},
        "thinking: Input tag 'sometimes' found using 'type' does not match any of the expected tags: 'adaptive', "
        "'between_tools', 'disabled', 'enabled'"),
    "bad display": (
        {"thinking": {"type": "adaptive", "display": "full"}, "messages": [Q]},
        "thinking.adaptive.display: Input should be 'summarized' or 'omitted'"),
    "adaptive on haiku 4.5": (
        {"model": "claude-haiku-4-5", "thinking": {"type": "adaptive"}, "messages": [Q]},
        "adaptive thinking is not supported on this model"),
    "effort on haiku 4.5": (
        {"model": "claude-haiku-4-5-20251001", "output_config": {"effort": "low"}, "messages": [Q]},
        "This model does not support the effort parameter."),
    "max effort on opus 4.5": (
        {"model": "claude-opus-4-5", "output_config": {"effort": "max"}, "messages": [Q]},
        "output_config.effort: 'max' is not supported by this model. Supported values: 'low', 'medium', 'high'"),
    "unknown effort": (
        {"output_config": {"effort": "extreme"}, "messages": [Q]},
        "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'"),
    "cache_control on thinking": (
        {"messages": [Q, assistant({**thought(), **EPHEMERAL}, text("a")), Q]},
        "messages.1.content.0.thinking.cache_control: Extra inputs are not permitted"),
    "cache_control on redacted thinking": (
        {"messages": [Q, assistant({**redacted(), **EPHEMERAL}, text("a")), Q]},
        "messages.1.content.0.redacted_thinking.cache_control: Extra inputs are not permitted"),
    "cache_control on empty text": (
        {"messages": [user(text("q"), text("", **EPHEMERAL))]},
        "messages.0.content.1.text: cache_control cannot be set for empty text blocks"),
    "cache_control on empty system text": (
        {"system": [text("", **EPHEMERAL)], "messages": [Q]},
        "system.0.text: cache_control cannot be set for empty text blocks"),
    "pdf not base64": (
        {"messages": [user(document({"type": "base64", "media_type": "application/pdf", "data": "JVBERi!!"}))]},
        "messages.0.content.0.pdf.source.base64.data: The PDF specified was not valid."),
    "pdf not a pdf": (
        {"messages": [user(text("read"), document({"type": "base64", "media_type": "application/pdf",
                                                    "data": base64.b64encode(b"hello").decode()}))]},
        "messages.0.content.1.pdf.source.base64.data: The PDF specified was not valid."),
    "text document not text/plain": (
        {"messages": [user(document({"type": "text", "media_type": "text/html", "data": "<p>"}))]},
        "messages.0.content.0.document.source.text.media_type: Input should be 'text/plain'"),
    "url document not http": (
        {"messages": [user(document({"type": "url", "url": "ftp://example.com/a.pdf"}))]},
        "messages.0.content.0.document.source.url.url: Input should be a valid URL"),
    "unknown document source": (
        {"messages": [user(document({"type": "path", "path": "/etc/passwd"}))]},
        "messages.0.content.0.document.source: Input tag 'path' found using 'type' does not match any of the "
        "expected tags: 'base64', 'content', 'file', 'text', 'url'"),
    "allowed and blocked domains": (
        {"tools": [{"name": "calc", "input_schema": {"type": "object"}},
                   {"type": "web_search_20250305", "name": "web_search", "allowed_domains": ["a.com"],
                    "blocked_domains": ["b.com"]}], "messages": [Q]},
        "tools.1.web_search_20250305: Cannot specify both allowed_domains and blocked_domains in the same request"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("body,message", list(REFUSED.values()), ids=list(REFUSED))
async def test_refused(fake: FakeAnthropic, body: dict[str, Any], message: str) -> None:
    fake.script({"text": "never"})
    r = await post(fake, body)
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": message},
                        "request_id": r.headers["request-id"]}
    assert fake.queued == 1  # a refused request does not use the script
    with pytest.raises(anthropic.BadRequestError) as info:  # the SDK sees the same
        await client(fake).messages.create(**{"model": MODEL, "max_tokens": 2048, **body})
    assert info.value.body["error"]["message"] == message  # type: ignore[index]


ACCEPTED: dict[str, dict[str, Any]] = {
    "prefill": {"messages": [Q, assistant(text("Sure:"))]},
    "pause_turn continuation": {"messages": [Q, assistant(thought(), call("srvtoolu_1", "server_tool_use"))],
                                "thinking": THINK},
    "server tool result in the answer": {"messages": [
        Q, assistant(call("srvtoolu_1", "server_tool_use"),
                     {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [SEARCH_RESULT]},
                     text("found")), Q]},
    "tool loop with thinking": {"thinking": THINK, "messages": [Q, assistant(thought(), call()), user(result())]},
    "tool loop starting with redacted thinking": {"thinking": {"type": "adaptive"}, "messages": [
        Q, assistant(redacted(), thought(), call()), user(result())]},
    "multi-step loop thinking only first": {"thinking": THINK, "messages": [
        Q, assistant(thought(), call()), user(result()), assistant(call("toolu_2")), user(result("toolu_2"))]},
    "loop without thinking, thinking off": {"messages": [Q, assistant(call()), user(result())]},
    "old turn without thinking": {"thinking": THINK, "messages": [
        Q, assistant(call()), user(result()), assistant(text("done")), Q]},
    "results and text": {"messages": [Q, assistant(call()), user(result(), text("also this"))]},
    "merged user messages": {"messages": [Q, assistant(call()), user(result()), user(text("more"))]},
    "merged assistant messages": {"messages": [
        Q, assistant(call("srvtoolu_1", "server_tool_use")), assistant(text("then"), call()), user(result())]},
    "trailing tool_use": {"messages": [Q, assistant(call())]},
    "interleaved budget above max_tokens": {"thinking": {"type": "enabled", "budget_tokens": 4096},
                                            "messages": [Q], "_beta": "interleaved-thinking-2025-05-14"},
    "adaptive on opus 4.6": {"model": "claude-opus-4-6", "thinking": {"type": "adaptive", "display": "omitted"},
                             "output_config": {"effort": "max"}, "messages": [Q]},
    "effort high on opus 4.5": {"model": "claude-opus-4-5-20251101", "output_config": {"effort": "high"},
                                "messages": [Q]},
    "unknown model takes everything": {"thinking": {"type": "adaptive"}, "output_config": {"effort": "xhigh"},
                                       "messages": [Q]},
    "documents": {"messages": [user(
        document({"type": "base64", "media_type": "application/pdf", "data": PDF}),
        document({"type": "text", "media_type": "text/plain", "data": "plain"}),
        document({"type": "url", "url": "https://example.com/a.pdf"}),
        document({"type": "content", "content": "c"}), text("summarise", **EPHEMERAL))]},
    "one domain list": {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch", "blocked_domains": ["b.com"],
                                   "allowed_domains": None}], "messages": [Q]},
}


@pytest.mark.asyncio
@pytest.mark.parametrize("body", list(ACCEPTED.values()), ids=list(ACCEPTED))
async def test_accepted(fake: FakeAnthropic, body: dict[str, Any]) -> None:
    beta = body.pop("_beta", None)
    r = await post(fake, body, **({"anthropic-beta": beta} if beta else {}))
    body["_beta"] = beta
    assert r.status_code == 200, r.text


@pytest.mark.asyncio
async def test_thinking_round_trip_through_the_sdk(fake: FakeAnthropic) -> None:
    """What the fake answers (streamed or not) goes back unchanged and passes; changed, it is refused."""
    fake.script({"thinking": "Use calc.", "redacted_thinking": "x", "tool_use": [{"name": "calc", "input": {}}]},
                {"thinking": "Again.", "tool_use": [{"name": "calc", "input": {}}]})
    sdk = client(fake)
    kw: dict[str, Any] = {"model": MODEL, "max_tokens": 2048, "thinking": THINK}
    first = await sdk.messages.create(messages=USER_HI, **kw)  # type: ignore[arg-type]
    async with sdk.messages.stream(messages=USER_HI, **kw) as s:  # type: ignore[arg-type]
        second = await s.get_final_message()
    for answer in (first, second):
        blocks = [b.model_dump(exclude_none=True) for b in answer.content]
        history = [*USER_HI, {"role": "assistant", "content": blocks},
                   user(result(blocks[-1]["id"]))]
        again = await sdk.messages.create(messages=history, **kw)  # type: ignore[arg-type]
        assert again.content[0].type == "thinking"  # the offline model thinks too
        blocks[0]["thinking"] += " "
        with pytest.raises(anthropic.BadRequestError, match="Invalid `signature` in `thinking` block"):
            await sdk.messages.create(messages=history, **kw)  # type: ignore[arg-type]


# -- the offline model thinks ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_offline_model_thinks_when_asked(fake: FakeAnthropic) -> None:
    sdk = client(fake)
    plain = await sdk.messages.create(model=MODEL, max_tokens=2048, messages=USER_HI)  # type: ignore[arg-type]
    assert [b.type for b in plain.content] == ["text"] and plain.usage.output_tokens_details is None
    answer = await sdk.messages.create(model=MODEL, max_tokens=2048, thinking=THINK,  # type: ignore[arg-type]
                                       messages=[{"role": "user", "content": " hello \n world "}])
    thinking, reply = answer.content
    assert thinking.type == "thinking" and thinking.thinking == "The user wrote: hello world"
    assert signing.signed(thinking.thinking, thinking.signature)
    assert reply.type == "text" and reply.text == model.OFFLINE_PREFIX + "hello world"
    assert answer.usage.output_tokens_details is not None and answer.usage.output_tokens_details.thinking_tokens == 5
    # the calculator loop, with adaptive thinking on a model that takes it, streamed
    tool = {"name": "calculator", "input_schema": {"type": "object"}}
    question = [{"role": "user", "content": "What is 6 * 7?"}]
    kw: dict[str, Any] = {"model": "claude-opus-4-6", "max_tokens": 2048, "tools": [tool],
                          "thinking": {"type": "adaptive"}}
    async with sdk.messages.stream(messages=question, **kw) as s:
        first = await s.get_final_message()
    assert [b.type for b in first.content] == ["thinking", "tool_use"] and first.stop_reason == "tool_use"
    history = [*question, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
               user(result(first.content[1].id))]  # type: ignore[union-attr]
    second = await sdk.messages.create(messages=history, **kw)
    assert [b.type for b in second.content] == ["thinking", "text"]
    assert second.content[1].text == "The result is 42."  # type: ignore[union-attr]


# -- the Models API -----------------------------------------------------------------------------


def _keys(model_type: Any) -> set[str]:
    return set(model_type.model_fields)


@pytest.mark.asyncio
async def test_models_retrieve(fake: FakeAnthropic) -> None:
    sdk = client(fake)
    sonnet = await sdk.models.retrieve("claude-sonnet-4-5")
    assert (sonnet.type, sonnet.id, sonnet.display_name) == ("model", "claude-sonnet-4-5-20250929", "Claude Sonnet 4.5")
    assert sonnet.created_at.year == 2025 and sonnet.lifecycle == "active" and sonnet.line == "sonnet"
    caps = sonnet.capabilities
    assert caps is not None
    raw = (await sdk.models.with_raw_response.retrieve("claude-sonnet-4-5")).http_response.json()["capabilities"]
    assert set(raw) == _keys(ModelCapabilities)  # every capability key present
    for name, field in ModelCapabilities.model_fields.items():
        nested = typing.get_args(field.annotation) or (field.annotation,)
        assert set(raw[name]) >= {k for t in nested if hasattr(t, "model_fields") for k, f in t.model_fields.items()
                                  if f.is_required()}
    assert set(raw["effort"]) == {"supported", "low", "medium", "high", "xhigh", "max"}
    assert set(raw["thinking"]["types"]) == {"adaptive", "between_tools", "disabled", "enabled"}
    assert not caps.thinking.types.adaptive.supported and caps.thinking.types.enabled.supported
    assert not caps.effort.supported
    opus45 = (await sdk.models.retrieve("claude-opus-4-5")).capabilities
    assert opus45 is not None and opus45.effort.supported and not opus45.thinking.types.adaptive.supported
    assert [getattr(opus45.effort, e).supported for e in catalog.EFFORT_LEVELS] == [True, True, True, False, False]
    opus46 = (await sdk.models.retrieve("claude-opus-4-6")).capabilities
    assert opus46 is not None and opus46.thinking.types.adaptive.supported and opus46.effort.max.supported
    with pytest.raises(anthropic.NotFoundError) as info:
        await sdk.models.retrieve("claude-nope")
    assert info.value.body == {"type": "error", "request_id": info.value.request_id,  # type: ignore[comparison-overlap]
                               "error": {"type": "not_found_error", "message": "model: claude-nope"}}
    # the fake's own table: new ids, and overrides merged into the generated answer
    fake.models["claude-test"] = {"display_name": "Test", "capabilities": {"thinking": {"types": {
        "adaptive": {"supported": False}}}}}
    mine = await sdk.models.retrieve(MODEL)
    assert mine.display_name == "Test" and mine.capabilities and not mine.capabilities.thinking.types.adaptive.supported
    assert mine.capabilities.effort.supported  # the rest stays
    r = await post(fake, {"thinking": {"type": "adaptive"}, "messages": USER_HI})
    assert r.status_code == 400 and r.json()["error"]["message"] == "adaptive thinking is not supported on this model"
    async with httpx2.AsyncClient(base_url=fake.base_url) as http:
        added = await http.post("/_fake/models", json={"claude-extra-1": {"max_tokens": 10}})
        assert added.status_code == 200 and added.json() == {"models": ["claude-extra-1", "claude-test"]}
        assert (await http.post("/_fake/models", json=["x"])).status_code == 400
        assert (await http.post("/v1/models/claude-extra-1", headers={"x-api-key": "k"})).status_code == 405
        assert (await http.get("/v1/models/claude-extra-1")).status_code == 401
    assert (await sdk.models.retrieve("claude-extra-1")).max_tokens == 10
    fake.reset()
    assert fake.models == {}


def test_catalog_covers_the_sdk_models() -> None:
    sdk_ids = {a for arg in typing.get_args(Model) for a in typing.get_args(arg)}
    assert sdk_ids and sdk_ids <= set(catalog.SDK_MODELS)
