"""A principal's conversations (`GET /sessions`, `PATCH /sessions/{id}`): listed newest first
across servers and workers, paged with a cursor while turns land, only the caller's own,
titled from the first message at once and (TITLE_MODEL) by a short model call afterwards,
renamed, and forgotten when deleted or expired; a turn still costs two Redis round trips."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from urllib.parse import urlparse

import httpx
import pytest

from bench.redis_proxy import RedisProxy
from server import sessions
from server.config import DEFAULT_PRICES
from server.security.keys import principal_for_digest
from server.store.base import new_id, principal_tag
from server.usage import PriceTable, Usage

from .conftest import BOTH_STORES
from .harness import eventually
from .test_openapi import check

# Keys of this run (a shared Redis keeps the sessions of earlier runs, listed under their keys).
KEY_A, KEY_B = f"sk-agent-alice-{new_id()}", f"sk-agent-bob-{new_id()}"
ALICE, BOB = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
OPEN = dict(AGENT_API_KEYS=f"{KEY_A},{KEY_B}", RATE_LIMIT_RPM=0, RATE_LIMIT_TPM=0,
            MAX_CONCURRENT_STREAMS_PER_PRINCIPAL=0)


@pytest.fixture(autouse=True)
def fresh_keys() -> None:
    """New API keys for each test: its principals start with no sessions."""
    global KEY_A, KEY_B
    KEY_A, KEY_B = f"sk-agent-alice-{new_id()}", f"sk-agent-bob-{new_id()}"
    ALICE["Authorization"], BOB["Authorization"] = f"Bearer {KEY_A}", f"Bearer {KEY_B}"
    OPEN["AGENT_API_KEYS"] = f"{KEY_A},{KEY_B}"
SUMMARY = {"session_id", "title", "title_source", "created_at", "updated_at", "turns", "preview", "usage",
           "estimated_cost_usd", "running_turn_id"}
TITLE_MODEL = "claude-haiku-4-5"


def index_key(api_key: str) -> str:
    """The Redis key of a key's sessions index (its principal, as the server names it, digested)."""
    return f"agent:sessions:{{{principal_tag(principal_for_digest(hashlib.sha256(api_key.encode()).digest()))}}}"


async def turn(client: httpx.AsyncClient, url: str, headers: dict[str, str], message: str,
               session_id: str | None = None) -> dict:
    body = {"message": message, **({"session_id": session_id} if session_id else {})}
    r = await client.post(url + "/agent", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def listing(client: httpx.AsyncClient, url: str, headers: dict[str, str], **params: object) -> dict:
    r = await client.get(url + "/sessions", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def ids(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> list[str]:
    return [s["session_id"] for s in (await listing(client, url, headers, limit=100))["sessions"]]


@BOTH_STORES
async def test_listing_across_servers_pages_renames_and_forgets(start_server, upstream, store_client):
    a = start_server(workers=2, name="list-a", wait=False, **OPEN)
    b = start_server(name="list-b", **OPEN)
    a.wait_ready()
    async with httpx.AsyncClient(timeout=30) as client:
        questions = ["Plan a weekend in Lisbon", "What is a monad,\n   really?", "Third  question"]
        mine = []
        for n, question in enumerate(questions):  # alternately on each server
            mine.append((await turn(client, (a, b)[n % 2].url, ALICE, question))["session_id"])
        theirs = (await turn(client, b.url, BOB, "Bob's own question"))["session_id"]

        for server in (a, b):  # the same list from every server (and worker)
            assert await ids(client, server.url, ALICE) == mine[::-1]
            assert await ids(client, server.url, BOB) == [theirs]
        check("SessionList", await listing(client, a.url, ALICE, limit=1))
        first = (await listing(client, a.url, ALICE))["sessions"][-1]
        assert set(first) == SUMMARY
        assert (first["session_id"], first["title"], first["title_source"], first["turns"]) == (
            mine[0], "Plan a weekend in Lisbon", "message", 1)
        assert first["preview"].endswith("You said: Plan a weekend in Lisbon") and first["running_turn_id"] is None
        assert first["usage"]["output_tokens"] > 0 and first["updated_at"] >= first["created_at"]
        view = (await client.get(f"{b.url}/sessions/{mine[0]}", headers=ALICE)).json()
        check("SessionView", view)
        assert {k: view[k] for k in SUMMARY} == first
        assert (await listing(client, b.url, ALICE))["sessions"][1]["title"] == "What is a monad, really?"

        # Paging while turns land: a session already listed moves up, a new one starts; the next
        # page goes on from the cursor, repeating and skipping nothing that did not change.
        page = await listing(client, a.url, ALICE, limit=2)
        assert [s["session_id"] for s in page["sessions"]] == [mine[2], mine[1]] and page["next_cursor"]
        await turn(client, b.url, ALICE, "once more", mine[2])
        newest = (await turn(client, a.url, ALICE, "A new one"))["session_id"]
        rest = await listing(client, b.url, ALICE, limit=2, cursor=page["next_cursor"])
        assert [s["session_id"] for s in rest["sessions"]] == [mine[0]] and rest["next_cursor"] is None
        assert await ids(client, a.url, ALICE) == [newest, mine[2], mine[1], mine[0]]
        moved = (await listing(client, a.url, ALICE, limit=2))["sessions"][1]
        assert moved["turns"] == 2 and moved["preview"].endswith("You said: once more")

        # Rename, on either server; only the owner may.
        r = await client.patch(f"{b.url}/sessions/{mine[1]}", json={"title": "  Monads\n explained "}, headers=ALICE)
        assert r.status_code == 200 and set(r.json()) == SUMMARY
        check("SessionSummary", r.json())
        assert (r.json()["title"], r.json()["title_source"]) == ("Monads explained", "user")
        listed = {s["session_id"]: s for s in (await listing(client, a.url, ALICE))["sessions"]}
        assert (listed[mine[1]]["title"], listed[mine[1]]["title_source"]) == ("Monads explained", "user")
        r = await client.patch(f"{a.url}/sessions/{mine[1]}", json={"title": "stolen"}, headers=BOB)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "session_not_found")
        assert (await client.get(f"{a.url}/sessions/{mine[1]}", headers=ALICE)).json()["title"] == "Monads explained"

        # Deleted on one server: gone from every list. Expired (its keys gone): not listed, and
        # dropped from the index by the listing.
        assert (await client.delete(f"{a.url}/sessions/{mine[0]}", headers=ALICE)).status_code == 204
        assert await ids(client, b.url, ALICE) == [newest, mine[2], mine[1]]
        assert store_client.zscore(index_key(KEY_A), mine[0]) is None
        store_client.delete(f"agent:{{{mine[1]}}}:meta")
        assert await ids(client, b.url, ALICE) == [newest, mine[2]]
        assert store_client.zscore(index_key(KEY_A), mine[1]) is None
        assert store_client.zscore(index_key(KEY_A), newest) is not None
        assert 0 < store_client.ttl(index_key(KEY_A)) <= 7 * 24 * 3600
        assert await ids(client, a.url, BOB) == [theirs]


async def test_bad_list_and_rename_requests(start_server, upstream):
    server = start_server(name="list-bad", redis=False, **OPEN)  # (the memory store)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        sid = (await turn(client, server.url, ALICE, "hello"))["session_id"]
        for params, field in [({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
                              ({"cursor": "not-a-cursor"}, "cursor"), ({"cursor": "MTIzOmFiYw"}, "cursor"),
                              ({"page": 2}, "page")]:
            r = await client.get("/sessions", params=params, headers=ALICE)
            assert (r.status_code, r.json()["error"]["code"], r.json()["error"].get("field")) == (
                400, "invalid_request", field), params
        assert (await client.get("/sessions")).status_code == 401
        assert (await client.get("/sessions", params={"limit": 100}, headers=ALICE)).json()["next_cursor"] is None
        for body, field in [({}, "title"), ({"title": ""}, "title"), ({"title": " \n\t "}, "title"),
                            ({"title": "x" * 201}, "title"), ({"title": 5}, "title"), ({"title": "ok", "x": 1}, "x")]:
            r = await client.patch(f"/sessions/{sid}", json=body, headers=ALICE)
            assert (r.status_code, r.json()["error"].get("field")) == (400, field), body
        r = await client.patch(f"/sessions/{sid}", content=b"{nope", headers=ALICE)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
        r = await client.patch("/sessions/bad!id", json={"title": "t"}, headers=ALICE)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_session_id")
        r = await client.patch("/sessions/" + "A" * 22, json={"title": "t"}, headers=ALICE)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "session_not_found")
        r = await client.patch(f"/sessions/{sid}", json={"title": "x" * 200 + "\x00"}, headers=ALICE)
        assert r.status_code == 200 and r.json()["title"] == "x" * 200  # (a control character is a blank)
        assert (await client.get("/sessions", headers=BOB)).json() == {"sessions": [], "next_cursor": None}


def test_titles_and_previews_from_messages():
    long = "When should I visit Lisbon, and what should I see there if I only have a weekend and like food?"
    title = sessions.message_title({"role": "user", "content": [{"type": "text", "text": long}]})
    assert title == "When should I visit Lisbon, and what should I see there if I only have a…"
    assert len(title) <= 80 and long.startswith(title[:-1])
    assert sessions.message_title({"content": [{"type": "text", "text": "x" * 300}]}) == "x" * 79 + "…"
    doc = {"type": "document", "title": "report.pdf", "source": {"type": "url", "url": "https://e.x/r.pdf"}}
    image = {"type": "image", "source": {"type": "url", "url": "https://e.x/i.png"}}
    assert sessions.message_title({"content": [doc, image]}) == "report.pdf"
    assert sessions.message_title({"content": [image, doc]}) == "Image"
    assert sessions.message_title({"content": [{**doc, "title": " "}]}) == "Document"
    answer = {"role": "assistant", "content": [{"type": "text", "text": "a\n\n b " * 100}]}
    tool = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "3"}]}
    assert sessions.preview([answer]) == ("a b " * 40)[:159] + "…"  # (collapsed, then cut at 160)
    assert sessions.preview([answer, tool]) == sessions.preview([answer]), "the last message with text"
    assert sessions.preview([tool]) == ""
    assert sessions.model_title('"Spring in Lisbon."\n') == "Spring in Lisbon"


def metric(text: str, name: str, **labels: str) -> float:
    """A Prometheus sample's value (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_model_title_after_the_first_answer(start_server, upstream):
    server = start_server(name="titles", TITLE_MODEL=TITLE_MODEL, **OPEN)
    title_usage = {"input_tokens": 1000, "output_tokens": 10, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 0}
    question = "When should I visit Lisbon, and what should I see there if I only have a weekend and like food?"
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        metrics_before = (await client.get("/metrics", headers=ALICE)).text
        # The first answer is slow: meanwhile the list shows the session, titled from the message.
        upstream.script({"text": "Go in spring: the light is lovely.", "ttft_ms": 1500},
                        {"text": '"Spring in Lisbon."', "usage": title_usage})
        running = asyncio.create_task(client.post("/agent", json={"message": question}, headers=ALICE))
        shown = await eventually(lambda: _first(client), timeout=10)
        assert shown and shown["running_turn_id"] and shown["turns"] == 0
        assert (shown["title"], shown["title_source"]) == (question[:72] + "…", "message")
        result = (await running).json()
        sid = result["session_id"]

        async def titled() -> dict | None:
            s = (await client.get(f"/sessions/{sid}", headers=ALICE)).json()
            return s if s["title_source"] == "model" else None

        view = await eventually(titled, timeout=10)
        assert view and view["title"] == "Spring in Lisbon"
        sent = upstream.requests()[1]["body"]
        assert sent["model"] == TITLE_MODEL and sent["max_tokens"] == sessions.TITLE_MAX_TOKENS
        assert sent["system"] == sessions.TITLE_INSTRUCTION and not sent.get("stream") and not sent.get("tools")
        text = sent["messages"][0]["content"][0]["text"]
        assert question in text and "Go in spring: the light is lovely." in text
        # The call's usage and cost are the session's too, and the metrics'.
        prices = PriceTable(DEFAULT_PRICES, 10)
        title_cost = prices.cost(TITLE_MODEL, Usage(1000, 10))
        assert view["usage"]["input_tokens"] == result["usage"]["input_tokens"] + 1000
        assert view["usage"]["output_tokens"] == result["usage"]["output_tokens"] + 10
        assert view["estimated_cost_usd"] == pytest.approx(result["estimated_cost_usd"] + title_cost)
        metrics_after = (await client.get("/metrics", headers=ALICE)).text
        for name, labels, delta in [("agent_tokens_total", {"model": TITLE_MODEL, "kind": "input"}, 1000),
                                    ("agent_tokens_total", {"model": TITLE_MODEL, "kind": "output"}, 10),
                                    ("agent_cost_usd_total", {"model": TITLE_MODEL}, title_cost)]:
            assert metric(metrics_after, name, **labels) - metric(metrics_before, name, **labels) == \
                pytest.approx(delta), name

        # Later turns make no title call; the owner's title is never replaced by the model's.
        upstream.script({"text": "Second answer."})
        await turn(client, server.url, ALICE, "And in summer?", sid)
        upstream.script({"text": "ok"}, {"text": "Model's title", "ttft_ms": 800, "usage": title_usage})
        other = await turn(client, server.url, ALICE, "Something else")
        r = await client.patch(f"/sessions/{other['session_id']}", json={"title": "Mine"}, headers=ALICE)
        assert r.json()["title_source"] == "user"

        async def charged() -> dict | None:
            s = (await client.get(f"/sessions/{other['session_id']}", headers=ALICE)).json()
            return s if s["usage"]["input_tokens"] > other["usage"]["input_tokens"] else None

        after = await eventually(charged, timeout=10)
        assert after and (after["title"], after["title_source"]) == ("Mine", "user")
        assert [r["body"]["model"] for r in upstream.requests()].count(TITLE_MODEL) == 2


async def _first(client: httpx.AsyncClient) -> dict | None:
    found = (await client.get("/sessions", headers=ALICE)).json()["sessions"]
    return found[0] if found else None


async def test_no_title_model_in_offline_mode(start_server, upstream):
    server = start_server(name="titles-offline", redis=False, ANTHROPIC_API_KEY="", ANTHROPIC_BASE_URL="",
                          TITLE_MODEL=TITLE_MODEL, OFFLINE_PACE_MS=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        assert (await client.get("/health")).json()["offline_model"] is True
        result = (await client.post("/agent", json={"message": "hello offline"})).json()
        await asyncio.sleep(1.0)
        view = (await client.get(f"/sessions/{result['session_id']}")).json()
        assert (view["title"], view["title_source"]) == ("hello offline", "message")
        assert view["usage"] == result["usage"], "no title call was made"
    assert upstream.requests() == []


async def test_a_turn_still_costs_two_redis_round_trips(start_server, upstream, redis_url):
    """Counted by a TCP proxy in front of Redis (bench/redis_proxy.py): a turn on an existing
    session, and a new session's first turn, are one begin and one commit; the index is
    written inside those scripts."""
    parsed = urlparse(redis_url)
    proxy = RedisProxy(parsed.port or 6379).start()
    server = None
    try:
        server = start_server(name="list-trips", REDIS_URL=f"redis://127.0.0.1:{proxy.port}{parsed.path}")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            upstream.script(*[{"text": "ok"}] * 4)
            sid = (await client.post("/agent", json={"message": "warm up"})).json()["session_id"]  # (scripts load)
            for body in ({"message": "again", "session_id": sid}, {"message": "a new session"}):
                await asyncio.sleep(0.3)
                before = proxy.snapshot()
                assert (await client.post("/agent", json=body)).status_code == 200
                await asyncio.sleep(0.3)
                after = proxy.snapshot()
                sent = {k: v - before["commands"].get(k, 0) for k, v in after["commands"].items()}
                assert after["trips"] - before["trips"] == 2, body
                assert {k.upper(): v for k, v in sent.items() if v} == {"EVALSHA": 2}, body
            listed = (await client.get("/sessions")).json()["sessions"]
            assert [s["title"] for s in listed[:2]] == ["a new session", "warm up"]
    finally:
        if server is not None:
            server.stop()  # (before its Redis connections' proxy)
        proxy.stop()


def test_summary_schema_is_the_documented_one():
    from server.openapi import SPEC

    assert set(SPEC["components"]["schemas"]["SessionSummary"]["properties"]) == SUMMARY
    assert json.dumps(SPEC["paths"]["/sessions"]["get"]["parameters"])
    assert re.fullmatch(r"[A-Za-z0-9_-]+", sessions.encode_cursor((1_700_000_000_000, "A" * 22)))
