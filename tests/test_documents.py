"""The request fields of issue #16: documents in `message`, `thinking` and `effort`.

Over real sockets (a server process and the fake upstream): every bad value is a 4xx with a stable
code and a message that says what to fix, and reaches neither the store nor the model; good
documents reach the model's request exactly as the client sent them. The parsing helpers
(`thinking_params`, `interleaved_beta`, `pdf_pages`) are checked directly.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Iterator

import httpx
import pytest
import websockets

from server.config import Settings
from server.errors import ApiError
from server.requests import interleaved_beta, parse_turn_request, pdf_pages, thinking_params

from .harness import FakeUpstream, Server, server_env

PATHS = ["/agent", "/agent/stream"]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="


def make_pdf(pages: int = 1, space: bytes = b" ", filler: int = 0) -> bytes:
    """A small valid PDF: catalog, page tree, `pages` empty pages (`/Type<space>/Page`), a correct
    xref table; `filler` bytes of comment make it bigger."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode()]
    objects += [b"<< /Type" + space + b"/Page /Parent 2 0 R /MediaBox [0 0 200 200] >>"] * pages
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + b"%" + b"x" * filler + b"\n" * bool(filler))
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def pdf_block(pdf: bytes, **extra: Any) -> dict[str, Any]:
    source = {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(pdf).decode()}
    return {"type": "document", "source": source, **extra}


def text_doc(data: str, **extra: Any) -> dict[str, Any]:
    return {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": data}, **extra}


def url_doc(url: str = "https://example.com/report.pdf", **extra: Any) -> dict[str, Any]:
    return {"type": "document", "source": {"type": "url", "url": url}, **extra}


def ask(*blocks: dict[str, Any], text: str = "Summarize.") -> list[dict[str, Any]]:
    return [*blocks, {"type": "text", "text": text}]


def assert_error(r: httpx.Response, status: int, code: str, mentions: str, field: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["retryable"]) == (code, False), r.text
    assert mentions in error["message"], r.text
    if field is not None:
        assert error["field"] == field, r.text


def sent_content(upstream: FakeUpstream) -> list[dict[str, Any]]:
    """The user message of the model's (only) request, without our cache breakpoint."""
    [request] = upstream.requests()
    content = request["body"]["messages"][-1]["content"]
    return [{k: v for k, v in block.items() if k != "cache_control"} for block in content]


# -- the PDF page count --------------------------------------------------------------------------
def test_pdf_pages_counts_page_objects_whatever_the_whitespace():
    assert [pdf_pages(make_pdf(n)) for n in (1, 2, 7)] == [1, 2, 7]
    for space in (b"", b"\n", b"\r\n  ", b"\t", b"\x00", b"\x0c"):
        assert pdf_pages(make_pdf(3, space)) == 3, space
    assert pdf_pages(b"<</Type/Page>> <</Type /Page/Parent 2 0 R>> <</Type /Page[") == 3
    # The page tree (/Pages) and other names starting with Page are not pages.
    assert pdf_pages(b"<</Type /Pages /Count 9>> <</Type /PageLabel>> <</Type /Page#20>>") == 0


# -- parsing (no server): thinking and effort ----------------------------------------------------
def parse(body: dict[str, Any], **env: str) -> Any:
    return parse_turn_request({"message": "hi", **body}, Settings.from_env(env))


def test_thinking_params_request_values_win_over_the_deployments():
    env = {"THINKING_BUDGET_TOKENS": "2048", "THINKING_DISPLAY": "omitted", "THINKING_EFFORT": "low",
           "MAX_OUTPUT_TOKENS": "8192", "THINKING_INTERLEAVED": "true"}
    settings = Settings.from_env(env)
    req = parse({}, **env)
    assert thinking_params(req, settings) == {"thinking": {"type": "enabled", "budget_tokens": 2048,
                                                           "display": "omitted"},
                                              "output_config": {"effort": "low"}}
    assert interleaved_beta(req, settings)
    req = parse({"thinking": {"type": "adaptive"}, "effort": "max"}, **env)
    assert (req.thinking, req.effort) == ({"type": "adaptive"}, "max")
    assert thinking_params(req, settings) == {"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}
    assert not interleaved_beta(req, settings)
    req = parse({"thinking": {"type": "disabled"}}, **env)
    assert thinking_params(req, settings) == {"thinking": {"type": "disabled"}, "output_config": {"effort": "low"}}
    req = parse({"thinking": {"type": "enabled", "budget_tokens": 4000, "display": "summarized"}}, **env)
    assert thinking_params(req, settings)["thinking"] == {"type": "enabled", "budget_tokens": 4000,
                                                          "display": "summarized"}
    assert interleaved_beta(req, settings)


def test_thinking_params_without_any_config_add_nothing():
    settings = Settings.from_env({})
    req = parse({})
    assert (req.thinking, req.effort) == (None, None)
    assert thinking_params(req, settings) == {} and not interleaved_beta(req, settings)
    assert thinking_params(parse({"effort": "medium"}), settings) == {"output_config": {"effort": "medium"}}
    adaptive = Settings.from_env({"THINKING_ADAPTIVE": "true", "THINKING_DISPLAY": "summarized",
                                  "THINKING_INTERLEAVED": "true"})
    assert thinking_params(parse({}), adaptive) == {"thinking": {"type": "adaptive", "display": "summarized"}}
    assert not interleaved_beta(parse({}), adaptive)  # (the beta is for budget thinking)
    # The interleaved beta follows the thinking actually used, even without a deployment default.
    interleaved = Settings.from_env({"THINKING_INTERLEAVED": "true"})
    assert interleaved_beta(parse({"thinking": {"type": "enabled", "budget_tokens": 1024}}), interleaved)
    assert not interleaved_beta(parse({}), interleaved)


def test_a_request_budget_is_checked_against_the_capped_max_tokens():
    req = parse({"max_tokens": 100_000, "thinking": {"type": "enabled", "budget_tokens": 4000}})
    assert req.max_tokens == 4096 and req.thinking == {"type": "enabled", "budget_tokens": 4000}
    with pytest.raises(ApiError, match=r"\(4096\) must be less than `max_tokens` \(4096\)"):
        parse({"max_tokens": 100_000, "thinking": {"type": "enabled", "budget_tokens": 4096}})


# -- over HTTP: bad input ------------------------------------------------------------------------
BAD_DOCUMENTS = [
    ({"type": "document"}, "source"),
    ({"type": "document", "source": "https://example.com/a.pdf"}, "source"),
    ({"type": "document", "source": {"type": "file", "file_id": "file_1"}},
     "'base64' (a PDF), 'url' (a PDF) or 'text'"),
    ({"type": "document", "source": {"type": ["url"], "url": "https://x.example/a.pdf"}}, "source"),
    ({"type": "document", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}, "application/pdf"),
    ({"type": "document", "source": {"type": "base64", "media_type": ["application/pdf"], "data": PNG}},
     "application/pdf"),
    ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf"}}, "base64 `data`"),
    ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "%PDF-1.4@@"}},
     "not valid base64"),
    ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PNG}}, "not a PDF"),
    (url_doc("http://example.com/a.pdf"), "https://"),
    (url_doc("https://example.com/" + "a" * 2030), "at most 2048 characters"),
    ({"type": "document", "source": {"type": "url", "url": {"href": "https://x.example"}}}, "https://"),
    ({"type": "document", "source": {"type": "text", "media_type": "text/html", "data": "<p>hi</p>"}}, "text/plain"),
    ({"type": "document", "source": {"type": "text", "data": "hi"}}, "text/plain"),
    (text_doc("   "), "non-empty `data`"),
    (text_doc(["hi"]), "non-empty `data`"),
    (text_doc("notes", title=5), "`message[0]`.title must be a string"),
    (text_doc("notes", context=["x"]), "`message[0]`.context must be a string"),
    (text_doc("notes", citations=True), '{"enabled": true}'),
    (text_doc("notes", citations={"enabled": "yes"}), '{"enabled": true}'),
    (text_doc("notes", citations={"enabled": True, "mode": "all"}), '{"enabled": true}'),
]


@pytest.mark.parametrize("path", PATHS)
async def test_bad_documents_are_400_invalid_document(shared_server: Server, upstream, path):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=15) as client:
        for block, mentions in BAD_DOCUMENTS:
            r = await client.post(path, json={"message": ask(block)})
            assert_error(r, 400, "invalid_document", mentions, field="message")
        # A lone surrogate in a document's text is refused like one anywhere else.
        raw = '{"message":[{"type":"document","source":{"type":"text","media_type":"text/plain","data":"\\ud800"}}]}'
        r = await client.post(path, content=raw, headers={"content-type": "application/json"})
        assert_error(r, 400, "invalid_request", "surrogate", field="message")
    assert upstream.requests() == []


BAD_THINKING = [
    ({"thinking": "on"}, "`thinking` must be an object", "thinking"),
    ({"thinking": {"budget_tokens": 2048}}, "`type` is 'enabled', 'adaptive', 'disabled', 'between_tools'",
     "thinking"),
    ({"thinking": {"type": ["enabled"], "budget_tokens": 2048}}, "`thinking` must be an object", "thinking"),
    ({"thinking": {"type": "turbo"}}, "`thinking` must be an object", "thinking"),
    ({"thinking": {"type": "enabled"}}, "`thinking.budget_tokens` must be an integer of at least 1024", "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1023}}, "at least 1024", "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048.0}}, "at least 1024", "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": True}}, "at least 1024", "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 2048},
     "`thinking.budget_tokens` (2048) must be less than `max_tokens` (2048)", "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 4096}}, "less than `max_tokens` (4096)", "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048, "display": "full"}},
     "`thinking.display` must be summarized or omitted", "thinking"),
    ({"thinking": {"type": "adaptive", "display": ["omitted"]}}, "summarized or omitted", "thinking"),
    ({"thinking": {"type": "adaptive", "budget_tokens": 2048}}, "of type 'adaptive' takes only display, type",
     "thinking"),
    ({"thinking": {"type": "disabled", "display": "omitted"}}, "of type 'disabled' takes only type", "thinking"),
    ({"effort": "extreme"}, "`effort` must be one of low, medium, high, xhigh, max", "effort"),
    ({"effort": ["low"]}, "`effort` must be one of", "effort"),
    ({"effort": 3}, "`effort` must be one of", "effort"),
]


@pytest.mark.parametrize("path", PATHS)
async def test_bad_thinking_and_effort_are_400_invalid_thinking(shared_server: Server, upstream, path):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=15) as client:
        for fields, mentions, field in BAD_THINKING:
            r = await client.post(path, json={"message": "hi", **fields})
            assert_error(r, 400, "invalid_thinking", mentions, field=field)
    assert upstream.requests() == []


async def test_bad_request_fields_over_the_websocket(shared_server: Server, upstream):
    async with websockets.connect(f"{shared_server.ws_url}/agent/ws") as ws:
        for frame, code in [({"message": ask(url_doc("ftp://x.example/a.pdf"))}, "invalid_document"),
                            ({"message": "hi", "thinking": {"type": "enabled", "budget_tokens": 5}},
                             "invalid_thinking")]:
            await ws.send(json.dumps({"type": "message", **frame}))
            error = json.loads(await ws.recv())
            assert (error["type"], error["code"], error["retryable"]) == ("error", code, False), error
    assert upstream.requests() == []


# -- over HTTP: good documents and thinking reach the model unchanged ----------------------------
async def test_documents_reach_the_model_unchanged(shared_server: Server, upstream):
    blocks = [
        pdf_block(make_pdf(2), title="Report", context="Q3 figures", citations={"enabled": True}),
        url_doc(citations={"enabled": False}),
        text_doc("The sky is blue.\nGrass is green.", title="Notes", citations={"enabled": True}),
    ]
    upstream.script({"text": "Done."})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": ask(*blocks)})
        assert r.status_code == 200, r.text
        assert sent_content(upstream) == ask(*blocks)
        history = (await client.get(f"/sessions/{r.json()['session_id']}")).json()["messages"]
        assert history[0]["content"][:3] == blocks


async def test_request_thinking_and_effort_reach_the_model(shared_server: Server, upstream, fake: FakeUpstream):
    model = effort_model(fake)
    upstream.script({"text": "Thought about it."})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "hi", "max_tokens": 3000, "model": model, "effort": "high",
                                              "thinking": {"type": "enabled", "budget_tokens": 1024}})
        assert r.status_code == 200, r.text
    [request] = upstream.requests()
    body = request["body"]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert body["output_config"] == {"effort": "high"} and body["max_tokens"] == 3000


def effort_model(fake: FakeUpstream) -> str:
    """A model whose capabilities (the fake's Models API) include effort `high`, or the default
    model when the fake lists no capabilities."""
    default = Settings.from_env({}).default_model
    for model in [default, *Settings.from_env({}).model_prices]:
        r = fake.http.get(f"/v1/models/{model}", headers={"x-api-key": "sk-ant-test-upstream-key-0123456789",
                                                          "anthropic-version": "2023-06-01"})
        if r.status_code != 200 or not isinstance(r.json().get("capabilities"), dict):
            return default
        effort = r.json()["capabilities"].get("effort") or {}
        if effort.get("supported", True) and (effort.get("high") or {}).get("supported"):
            return model
    pytest.fail("no model of the fake supports effort 'high'")


# -- a deployment with tight limits and its own thinking config ----------------------------------
STRICT = {"MAX_DOCUMENT_PAGES": "2", "MAX_DOCUMENT_BYTES": "2048", "MAX_DOCUMENTS": "2", "MAX_MESSAGE_CHARS": "200",
          "ALLOW_CLIENT_THINKING": "false", "THINKING_BUDGET_TOKENS": "2048", "THINKING_DISPLAY": "summarized",
          "MAX_OUTPUT_TOKENS": "8192"}


@pytest.fixture(scope="module")
def strict_server(fake: FakeUpstream, redis_url: str) -> Iterator[Server]:
    server = Server(server_env(fake, redis_url, **STRICT), name="documents-strict").start()
    yield server
    server.stop()


async def test_document_limits(strict_server: Server, upstream):
    async with httpx.AsyncClient(base_url=strict_server.url, timeout=15) as client:
        async def refused(status: int, code: str, mentions: str, *blocks: dict[str, Any], text: str = "Hi") -> None:
            assert_error(await client.post("/agent", json={"message": ask(*blocks, text=text)}), status, code,
                         mentions, field="message")

        await refused(413, "too_many_documents", "At most 2 documents per message.",
                      text_doc("a"), url_doc(), text_doc("c"))
        await refused(413, "document_too_large", "`message[0]` has 3 pages; documents are limited to 2 pages.",
                      pdf_block(make_pdf(3)))
        await refused(413, "document_too_large", "Documents are limited to 2048 bytes.",
                      pdf_block(make_pdf(1, filler=2048)))
        # The size is checked before decoding: a huge `data` is refused as too large, not decoded.
        huge = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "@" * 10_000}}
        await refused(413, "document_too_large", "Documents are limited to 2048 bytes.", huge)
        # Text documents (and titles and contexts) count toward MAX_MESSAGE_CHARS.
        await refused(413, "message_too_long", "longer than 200 characters", text_doc("x" * 190), text="y" * 11)
        await refused(413, "message_too_long", "longer than 200 characters",
                      text_doc("x" * 100, title="t" * 50, context="c" * 50), text="y")
    assert upstream.requests() == []

    upstream.script({"text": "Fine."}, {"text": "Fine too."})
    async with httpx.AsyncClient(base_url=strict_server.url, timeout=30) as client:
        at_limits = [pdf_block(make_pdf(2, filler=1024)), text_doc("x" * 150, title="t" * 30)]
        r = await client.post("/agent", json={"message": ask(*at_limits, text="y" * 20)})
        assert r.status_code == 200, r.text
        assert sent_content(upstream) == ask(*at_limits, text="y" * 20)
        # A PDF whose pages cannot be counted (all in compressed object streams) is accepted.
        opaque = pdf_block(b"%PDF-1.7\n1 0 obj\n<< /Type /ObjStm /N 5 /First 40 /Length 3 >>\nstream\nxyz\n"
                           b"endstream\nendobj\n%%EOF\n")
        r = await client.post("/agent", json={"message": ask(opaque), "session_id": r.json()["session_id"]})
        assert r.status_code == 200, r.text
        assert upstream.requests()[-1]["body"]["messages"][-1]["content"][0] == opaque


async def test_deployment_thinking_and_the_client_switch(strict_server: Server, upstream):
    async with httpx.AsyncClient(base_url=strict_server.url, timeout=30) as client:
        for fields, field in [({"thinking": {"type": "disabled"}}, "thinking"), ({"effort": "low"}, "effort"),
                              ({"thinking": "garbage", "effort": "low"}, "thinking")]:
            r = await client.post("/agent", json={"message": "hi", **fields})
            assert_error(r, 400, "thinking_not_allowed", "does not accept `thinking` or `effort`", field=field)
        r = await client.post("/agent", json={"message": "hi", "max_tokens": 2048})
        assert_error(r, 400, "invalid_thinking", "`max_tokens` must be more than this server's thinking budget "
                                                 "(2048 tokens)", field="max_tokens")
        assert upstream.requests() == []

        upstream.script({"text": "Thought."})
        r = await client.post("/agent", json={"message": "hi", "max_tokens": 4000})
        assert r.status_code == 200, r.text
    [request] = upstream.requests()
    assert request["body"]["thinking"] == {"type": "enabled", "budget_tokens": 2048, "display": "summarized"}
    assert request["body"]["max_tokens"] == 4000 and "output_config" not in request["body"]
