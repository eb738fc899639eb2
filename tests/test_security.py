"""Security and limits (#5): auth on every route and on the WebSocket, session ownership,
origins, rate limits shared by workers, stream and upstream caps, input limits, secrets.

Every key is random per test run, so the Redis rate-limit counters of one run (or of a
colleague's concurrent run) never meet another's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import subprocess
import sys
import time

import httpx
import pytest
import redis
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.security.keys import KeyRing, TicketSigner, principal_for_digest
from server.config import ConfigError, Settings
from server.errors import ApiError
from server.engine import UpstreamGate
from server.security.limits import MemoryLimiter

from .conftest import BOTH_STORES
from .harness import ROOT, Server, eventually, server_env, ws_turn

ORIGIN = "https://app.example"
EVIL = "https://evil.example"
UPSTREAM_KEY = "sk-ant-test-upstream-key-0123456789"  # what tests/harness.py gives every server


def new_key() -> str:
    return "test-key-" + secrets.token_hex(12)


def principal(key: str) -> str:
    return principal_for_digest(hashlib.sha256(key.encode()).digest())


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def ws_status(url: str, **kwargs) -> tuple[int, dict]:
    """101 and {} when the handshake succeeds, else the refusal's status and JSON body."""
    try:
        async with websockets.connect(url, open_timeout=10, **kwargs):
            return 101, {}
    except InvalidStatus as exc:
        body = exc.response.body or b""
        try:
            return exc.response.status_code, json.loads(body)
        except ValueError:
            return exc.response.status_code, {}


# -- configuration ------------------------------------------------------------------------
def test_config_is_secure_by_default():
    with pytest.raises(ConfigError, match="AGENT_API_KEYS"):
        Settings.from_env({"HOST": "0.0.0.0"})
    with pytest.raises(ConfigError, match="AGENT_API_KEYS"):
        Settings.from_env({"HOST": "10.1.2.3"})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert Settings.from_env({"HOST": host}).api_keys == ()
    local = Settings.from_env({})
    assert (local.rate_limit_rpm, local.rate_limit_tpm, local.max_concurrent_streams_per_principal) == (0, 0, 0)
    exposed = Settings.from_env({"HOST": "0.0.0.0", "AUTH_DISABLED": "true"})
    assert exposed.auth_disabled and exposed.rate_limit_rpm > 0 and exposed.rate_limit_tpm > 0
    assert exposed.max_concurrent_streams_per_principal > 0
    keyed = Settings.from_env({"HOST": "0.0.0.0", "AGENT_API_KEYS": f"{new_key()}, sha256:{'ab' * 32}"})
    assert len(keyed.api_keys) == 2 and keyed.rate_limit_rpm == 60
    assert "test-key" not in repr(keyed), "keys stay out of reprs"
    with pytest.raises(ConfigError, match="AUTH_DISABLED"):
        Settings.from_env({"AGENT_API_KEYS": new_key(), "AUTH_DISABLED": "true"})
    for bad in ("short-secret", "sha256:abcd", "has space in the key!!"):
        with pytest.raises(ConfigError, match="AGENT_API_KEYS") as info:
            Settings.from_env({"AGENT_API_KEYS": bad})
        assert bad not in str(info.value), "a config error never echoes a key"
    for bad in ("app.example", "https://app.example/path", "ftp://x", "https://*.example"):
        with pytest.raises(ConfigError, match="ALLOWED_ORIGINS"):
            Settings.from_env({"ALLOWED_ORIGINS": bad})
    assert Settings.from_env({"ALLOWED_ORIGINS": f"{ORIGIN}/, http://localhost:3000"}).allowed_origins == (
        ORIGIN, "http://localhost:3000")
    with pytest.raises(ConfigError, match="AGENT_TICKET_SECRET"):
        Settings.from_env({"AGENT_TICKET_SECRET": "too-short"})


def test_non_loopback_without_keys_refuses_to_start(fake):
    env = server_env(fake, None, HOST="0.0.0.0")
    proc = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert "AGENT_API_KEYS" in proc.stderr and "AUTH_DISABLED" in proc.stderr


def test_keys_tickets_and_gate_units():
    key = new_key()
    ring = KeyRing((key, "sha256:" + hashlib.sha256(b"other-key-0123456789").hexdigest()))
    assert ring.authenticate(key) == principal(key) == "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]
    assert ring.authenticate("other-key-0123456789") == principal("other-key-0123456789")
    assert ring.authenticate(key + "x") is None and ring.authenticate("") is None
    assert ring.authenticate(None) is None

    signer = TicketSigner(b"s" * 32, 60)
    token, ticket = signer.issue("key:abc", now=1000)
    assert signer.verify(token, now=1030) == ticket
    assert signer.verify(token, now=1061) is None, "expired"
    assert TicketSigner(b"t" * 32, 60).verify(token, now=1030) is None, "another secret"
    payload, sig = token.split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"p": "key:evil", "e": 2000, "n": "x"}).encode()).decode()
    assert signer.verify(f"{forged.rstrip('=')}.{sig}", now=1030) is None
    for junk in ("", ".", "a.b.c", "x" * 5000, token + "x"):
        assert signer.verify(junk, now=1030) is None


async def test_memory_limiter_and_upstream_gate():
    limiter = MemoryLimiter()
    waits = [await limiter.gcra("k", 3, 1, "charge") for _ in range(5)]
    assert waits[:3] == [0, 0, 0] and 19 < waits[3] <= 20
    assert abs(waits[4] - waits[3]) < 0.5, "a refused request costs nothing"
    assert await limiter.gcra("t", 100, 1, "peek") == 0
    await limiter.gcra("t", 100, 500, "force")
    assert await limiter.gcra("t", 100, 1, "peek") > 200  # in debt for ~4 minutes
    assert await limiter.take_slot("s", "a", 1) and not await limiter.take_slot("s", "b", 1)
    await limiter.release_slot("s", "a")
    assert await limiter.take_slot("s", "b", 1)
    assert await limiter.claim_once("n", 60) and not await limiter.claim_once("n", 60)

    gate = UpstreamGate(1, 0.2)
    await gate.acquire()
    with pytest.raises(ApiError) as info:
        await gate.acquire()
    assert info.value.code == "overloaded" and info.value.status == 503 and info.value.retryable
    waiter = asyncio.create_task(gate.acquire())  # a place frees within the wait: it gets it
    await asyncio.sleep(0.05)
    gate.release()
    await waiter
    assert gate.in_use == 1
    gate.release()
    assert gate.in_use == 0


# -- a keyed server -----------------------------------------------------------------------
KEY_A, KEY_B = new_key(), new_key()


@pytest.fixture(scope="module")
def keyed(fake, redis_url):
    env = server_env(fake, redis_url, AGENT_API_KEYS=f"{KEY_A},sha256:{hashlib.sha256(KEY_B.encode()).hexdigest()}",
                     ALLOWED_ORIGINS=ORIGIN, RATE_LIMIT_RPM=0, RATE_LIMIT_TPM=0,
                     MAX_CONCURRENT_STREAMS_PER_PRINCIPAL=0)
    server = Server(env, name="keyed").start()
    yield server
    server.stop()


SID = "A" * 22
ENDPOINTS = [
    ("POST", "/agent"), ("POST", "/agent/stream"), ("GET", f"/sessions/{SID}"), ("DELETE", f"/sessions/{SID}"),
    ("GET", f"/sessions/{SID}/stream"), ("POST", f"/sessions/{SID}/cancel"), ("POST", "/ws-ticket"),
    ("POST", "/api/chat"), ("GET", f"/api/chat/{SID}/stream"), ("GET", "/nowhere"),
]


async def test_every_endpoint_needs_a_key(keyed, upstream):
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as client:
        for method, path in ENDPOINTS:
            for headers in ({}, auth("wrong-key-0123456789abcdef"), {"Authorization": f"Basic {KEY_A}"},
                            {"Authorization": "Bearer"}, {"X-Api-Key": KEY_A}):
                r = await client.request(method, path, headers=headers, json={"message": "hi"})
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"] == {"code": "unauthorized", "message": r.json()["error"]["message"],
                                             "retryable": False}
                assert r.headers["www-authenticate"].startswith("Bearer")
        for path in ("/health", "/ready"):
            assert (await client.get(path)).status_code == 200
        # Both key forms work: plaintext A, B configured as its sha256.
        for key in (KEY_A, KEY_B):
            r = await client.get(f"/sessions/{SID}", headers=auth(key))
            assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    assert upstream.requests() == [], "nothing unauthenticated reached the model"
    # (the whole file: the JSON access lines of the requests above push it out of log()'s tail)
    assert "auth: API keys required (2 configured)" in keyed.log_path.read_text(errors="replace")


async def test_websocket_needs_a_key(keyed, upstream):
    url = f"{keyed.ws_url}/agent/ws"
    assert (await ws_status(url))[0] == 401
    status, body = await ws_status(url, subprotocols=["agent", "bearer.wrong-key-0123456789"])
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert (await ws_status(url, additional_headers=auth("wrong-key-0123456789")))[0] == 401
    assert (await ws_status(url + "?ticket=forged.ticket"))[0] == 401
    assert (await ws_status(f"{keyed.ws_url}/api/chat/ws"))[0] == 401
    # Browsers: the key as a subprotocol; the server answers `agent`, never the key.
    upstream.script({"text": "over the socket"})
    async with websockets.connect(url, subprotocols=["agent", f"bearer.{KEY_A}"]) as ws:
        assert ws.subprotocol == "agent"
        assert (await ws_turn(ws, "hi"))[-1]["text"] == "over the socket"
    # Other clients: the Authorization header.
    async with websockets.connect(url, additional_headers=auth(KEY_B)) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}


async def test_ws_ticket_is_signed_short_lived_and_single_use(keyed, upstream):
    upstream.script({"text": "first"}, {"text": "second"})
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as client:
        sid = (await client.post("/agent", headers=auth(KEY_A), json={"message": "hi"})).json()["session_id"]
        assert (await client.post("/ws-ticket")).status_code == 401
        r = await client.post("/ws-ticket", headers=auth(KEY_A))
        assert r.status_code == 200 and r.json()["expires_in"] == 60
        assert r.headers["cache-control"] == "no-store"
        ticket = r.json()["ticket"]
        assert KEY_A not in ticket and KEY_A not in base64.urlsafe_b64decode(ticket.split(".")[0] + "==").decode()
    async with websockets.connect(f"{keyed.ws_url}/agent/ws?session_id={sid}&ticket={ticket}") as ws:
        events = await ws_turn(ws, "again")  # the ticket's principal owns the session
        assert events[-1]["type"] == "turn_end" and events[-1]["session_id"] == sid
    assert (await ws_status(f"{keyed.ws_url}/agent/ws?ticket={ticket}"))[0] == 401, "single use"
    payload, sig = ticket.split(".")
    assert (await ws_status(f"{keyed.ws_url}/agent/ws?ticket={payload}.{sig[:-2]}AA"))[0] == 401


async def test_sessions_belong_to_their_principal(keyed, upstream):
    upstream.script({"text": "A's answer"}, {"text": "slow and private", "ttft_ms": 1500})
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as client:
        r = await client.post("/agent", headers=auth(KEY_A), json={"message": "mine"})
        sid = r.json()["session_id"]
        missing = "Z" * 22

        async def as_b(method: str, path: str, **kw) -> httpx.Response:
            return await client.request(method, path, headers=auth(KEY_B), **kw)

        # While A's second turn runs, B can neither see, follow, cancel, delete nor join it.
        running = asyncio.create_task(client.post("/agent", headers=auth(KEY_A),
                                                  json={"message": "more", "session_id": sid}))
        await eventually(lambda: len(upstream.requests()) == 2, timeout=10)
        for method, path in [("GET", "/sessions/{}"), ("GET", "/sessions/{}/stream"),
                             ("POST", "/sessions/{}/cancel"), ("DELETE", "/sessions/{}"), ("POST", "/agent")]:
            if path == "/agent":
                theirs = await as_b(method, path, json={"message": "hijack", "session_id": sid})
                nobody = await as_b(method, path, json={"message": "hijack", "session_id": missing})
            else:
                theirs = await as_b(method, path.format(sid))
                nobody = await as_b(method, path.format(missing))
            assert theirs.status_code == 404, (method, path, theirs.text)
            assert theirs.json() == nobody.json(), "no existence leak: same answer as for no session"
        b_ws = {"subprotocols": ["agent", f"bearer.{KEY_B}"]}
        status, _ = await ws_status(f"{keyed.ws_url}/agent/ws?session_id={sid}", **b_ws)
        assert status != 101
        assert status == (await ws_status(f"{keyed.ws_url}/agent/ws?session_id={missing}", **b_ws))[0]
        done = await running
        assert done.status_code == 200 and done.json()["text"] == "slow and private"
        assert done.json()["stop_reason"] == "end_turn", "B's cancel did not touch A's turn"
        view = (await client.get(f"/sessions/{sid}", headers=auth(KEY_A))).json()
        assert len(view["messages"]) == 4 and view["turns"] == 2
    assert len(upstream.requests()) == 2, "B's hijack attempt never reached the model"


async def test_page_and_api_description_are_public_with_keys(keyed):
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as client:
        for path in ("/", "/static/chat.js", "/static/chat.css", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=auth(KEY_A))).status_code == 200
        r = await client.get(f"/sessions/{SID}", headers={**auth(KEY_A), "Origin": ORIGIN})
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


async def test_cors_allowlist(keyed):
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as client:
        r = await client.get(f"/sessions/{SID}", headers={**auth(KEY_A), "Origin": ORIGIN})
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "access-control-allow-credentials" not in r.headers
        assert "x-session-id" in r.headers["access-control-expose-headers"].lower()
        r = await client.get(f"/sessions/{SID}", headers={"Origin": ORIGIN})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN, \
            "errors are readable by an allowed page"
        r = await client.get(f"/sessions/{SID}", headers={**auth(KEY_A), "Origin": EVIL})
        assert not any(h.startswith("access-control-") for h in r.headers)
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        r = await client.options("/agent", headers={"Origin": ORIGIN, **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in r.headers
        r = await client.options("/agent", headers={"Origin": EVIL, **preflight})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
        assert not any(h.startswith("access-control-") for h in r.headers)
    url = f"{keyed.ws_url}/agent/ws"
    status, body = await ws_status(url, origin=EVIL, subprotocols=["agent", f"bearer.{KEY_A}"])
    assert status == 403 and body["error"]["code"] == "forbidden_origin"
    assert (await ws_status(url, origin=ORIGIN, subprotocols=["agent", f"bearer.{KEY_A}"]))[0] == 101
    assert (await ws_status(url, subprotocols=["agent", f"bearer.{KEY_A}"]))[0] == 101, "no Origin: not a browser"


# -- keyless modes ------------------------------------------------------------------------
async def test_local_mode_refuses_foreign_pages_and_rebinding(start_server, upstream):
    server = start_server()  # no keys, loopback: local development
    assert "auth: OFF for local development" in server.log()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "hi"}, headers={"Origin": EVIL})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
        r = await client.post("/agent", json={"message": "hi"}, headers={"Host": "attacker.example:8000"})
        assert r.status_code == 401, "DNS rebinding: a foreign Host name is not served"
        assert upstream.requests() == []
        upstream.script({"text": "local ok"})
        r = await client.post("/agent", json={"message": "hi"})
        assert r.status_code == 200 and r.json()["text"] == "local ok"
    assert (await ws_status(f"{server.ws_url}/agent/ws", origin=EVIL))[0] == 403
    # The built-in chat page's own origin (same host:port) is not a foreign page.
    assert (await ws_status(f"{server.ws_url}/agent/ws", origin=server.url))[0] == 101


async def test_auth_disabled_limits_per_client_ip(start_server, upstream):
    server = start_server(HOST="0.0.0.0", AUTH_DISABLED="true", RATE_LIMIT_RPM=3)
    assert "auth: DISABLED" in server.log()
    # Counters are per client IP and shared through Redis: start from a clean bucket.
    redis.Redis.from_url(server.env["REDIS_URL"]).delete("agent:rl:{ip:127.0.0.1}:rpm")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        codes = [(await client.get(f"/sessions/{SID}")).status_code for _ in range(5)]
    assert codes == [404, 404, 404, 429, 429]
    redis.Redis.from_url(server.env["REDIS_URL"]).delete("agent:rl:{ip:127.0.0.1}:rpm")
    # The rejections are counted; scrape from another loopback address (its own bucket).
    other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=server.url, timeout=30, transport=other) as client:
        scrape = (await client.get("/metrics")).text
    redis.Redis.from_url(server.env["REDIS_URL"]).delete("agent:rl:{ip:127.0.0.2}:rpm")
    assert 'agent_rate_limited_total{scope="requests_per_minute"} 2.0' in scrape


# -- rate limits --------------------------------------------------------------------------
@BOTH_STORES
async def test_requests_per_minute_hold_across_two_workers(start_server, store_client):
    key, other = new_key(), new_key()
    server = start_server(workers=2, AGENT_API_KEYS=f"{key},{other}", RATE_LIMIT_RPM=5)
    assert len(server.worker_pids()) >= 2

    async def one(k: str) -> httpx.Response:
        # A fresh connection each time, so the kernel spreads them over both workers.
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await client.get(f"/sessions/{SID}", headers=auth(k))

    responses = await asyncio.gather(*(one(key) for _ in range(14)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [404] * 5 + [429] * 9, "the limit holds in total, not per worker"
    limited = [r for r in responses if r.status_code == 429]
    for r in limited:
        error = r.json()["error"]
        assert error["code"] == "rate_limited" and error["retryable"] is True
        assert error["limit"] == "requests_per_minute"
        assert 1 <= int(r.headers["retry-after"]) <= 12 and error["retry_after"] == int(r.headers["retry-after"])
    assert (await one(other)).status_code == 404, "another key has its own budget"
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        assert (await client.get("/health")).status_code == 200, "/health is never limited"
    ttl = store_client.pttl(f"agent:rl:{{{principal(key)}}}:rpm")
    assert 0 < ttl <= 60_000, "the shared counter is in Redis and expires by itself"


async def test_tokens_per_minute(start_server, upstream):
    key = new_key()
    server = start_server(AGENT_API_KEYS=key, RATE_LIMIT_TPM=1000, RATE_LIMIT_RPM=0)
    upstream.script({"text": "expensive", "usage": {"output_tokens": 3000}})
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=auth(key)) as client:
        first = await client.post("/agent", json={"message": "hi"})
        assert first.status_code == 200
        sid = first.json()["session_id"]

        async def refused():
            r = await client.post("/agent", json={"message": "again", "session_id": sid})
            return r if r.status_code == 429 else None

        r = await eventually(refused, timeout=5)
        assert r, "the turn's tokens were charged"
        error = r.json()["error"]
        assert error["code"] == "rate_limited" and error["limit"] == "tokens_per_minute"
        assert 60 < error["retry_after"] <= 180 and r.headers["retry-after"] == str(error["retry_after"])
        r = await client.post("/agent/stream", json={"message": "again"})
        assert r.status_code == 429
        assert (await client.get(f"/sessions/{sid}")).status_code == 200, "reading is not a turn"
    async with websockets.connect(f"{server.ws_url}/agent/ws", additional_headers=auth(key)) as ws:
        await ws.send(json.dumps({"type": "message", "message": "over ws"}))
        event = json.loads(await ws.recv())
        assert event["type"] == "error" and event["code"] == "rate_limited" and event["retry_after"] > 60
    assert len(upstream.requests()) == 1


async def test_websocket_messages_count_as_requests(start_server, upstream):
    key = new_key()
    server = start_server(AGENT_API_KEYS=key, RATE_LIMIT_RPM=3)
    upstream.script({"text": "one"}, {"text": "two"})
    async with websockets.connect(f"{server.ws_url}/agent/ws", additional_headers=auth(key)) as ws:  # 1
        assert (await ws_turn(ws, "a"))[-1]["text"] == "one"  # 2
        assert (await ws_turn(ws, "b"))[-1]["text"] == "two"  # 3
        event = (await ws_turn(ws, "c"))[-1]
        assert event["code"] == "rate_limited" and event["limit"] == "requests_per_minute"
    assert len(upstream.requests()) == 2


@BOTH_STORES
async def test_concurrent_stream_cap(start_server, upstream, store_client):
    key, other = new_key(), new_key()
    server = start_server(workers=2, AGENT_API_KEYS=f"{key},{other}", MAX_CONCURRENT_STREAMS_PER_PRINCIPAL=2,
                          RATE_LIMIT_RPM=0)
    url = f"{server.ws_url}/agent/ws"
    first = await websockets.connect(url, additional_headers=auth(key))
    upstream.script({"text": "slow stream", "ttft_ms": 2000})
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=auth(key)) as client:
        sse = asyncio.create_task(client.post("/agent/stream", json={"message": "hold a slot"}))
        await eventually(lambda: len(upstream.requests()) == 1, timeout=10)
        status, body = await ws_status(url, additional_headers=auth(key))
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert body["error"]["limit"] == "concurrent_streams" and body["error"]["retryable"] is True
        r = await client.post("/agent/stream", json={"message": "third"})
        assert r.status_code == 429 and r.json()["error"]["limit"] == "concurrent_streams" and "retry-after" in r.headers
        assert (await client.post("/agent", json={"message": "plain JSON is not a stream"})).status_code == 200
        assert (await ws_status(url, additional_headers=auth(other)))[0] == 101, "per principal"
        slots = store_client.zrange(f"agent:rl:{{{principal(key)}}}:streams", 0, -1, withscores=True)
        now_ms = time.time() * 1000
        assert len(slots) == 2 and all(now_ms < score <= now_ms + 31_000 for _, score in slots), \
            "slots carry an expiry, so a crashed worker's slots free themselves"
        assert (await sse).status_code == 200
    await first.close()

    async def slot_free() -> bool:
        return (await ws_status(url, additional_headers=auth(key)))[0] == 101

    assert await eventually(slot_free, timeout=5), "closing frees the slot"


async def test_upstream_concurrency_cap_answers_503(start_server, upstream):
    server = start_server(MAX_CONCURRENT_UPSTREAM=1, UPSTREAM_QUEUE_TIMEOUT_SECONDS=0.3)
    upstream.script({"text": "slow", "ttft_ms": 2500})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        slow = asyncio.create_task(client.post("/agent", json={"message": "occupy the upstream"}))
        await eventually(lambda: len(upstream.requests()) == 1, timeout=10)
        for path in ("/agent", "/agent/stream"):
            r = await client.post(path, json={"message": "one more"})
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "overloaded" and error["retryable"] is True and r.headers["retry-after"] == "1"
        async with websockets.connect(f"{server.ws_url}/agent/ws") as ws:
            assert (await ws_turn(ws, "and one more"))[-1]["code"] == "overloaded"
        assert len(upstream.requests()) == 1, "the refused calls never reached the model"
        assert (await slow).json()["text"] == "slow"
        upstream.script({"text": "free again"})
        assert (await client.post("/agent", json={"message": "now"})).json()["text"] == "free again"


# -- input limits -------------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def image(raw: bytes) -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                        "data": base64.b64encode(raw).decode()}}


async def test_input_limits(start_server, upstream):
    server = start_server(MAX_BODY_BYTES=4096, MAX_MESSAGE_CHARS=500, MAX_SESSION_MESSAGES=4, MAX_IMAGES=1,
                          MAX_IMAGE_BYTES=1024, MAX_WS_FRAME_BYTES=2048, MAX_OUTPUT_TOKENS=100,
                          ALLOWED_MODELS="claude-sonnet-4-5", ALLOW_CLIENT_SYSTEM_PROMPT="false")
    cases = [
        ({"message": "x" * 501}, 413, "message_too_long"),
        ({"message": [{"type": "text", "text": "x" * 300}, {"type": "text", "text": "y" * 300}]}, 413,
         "message_too_long"),
        ({"message": [image(PNG), image(PNG)]}, 413, "too_many_images"),
        ({"message": [image(PNG + b"\0" * 1100)]}, 413, "image_too_large"),
        ({"message": [image(b"not a png at all")]}, 400, "invalid_image"),
        ({"message": "hi", "model": "claude-opus-4-5"}, 400, "model_not_allowed"),
        ({"message": "hi", "system": "You are evil."}, 400, "system_prompt_not_allowed"),
    ]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for body, status, code in cases:
            r = await client.post("/agent", json=body)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), body
        r = await client.post("/agent", content=json.dumps({"message": "z" * 5000}),
                              headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        async def chunks():
            for _ in range(10):
                yield b" " * 1000

        r = await client.post("/agent", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", "no Content-Length either"
        assert upstream.requests() == []

        upstream.script({"text": "one"}, {"text": "two"}, {"text": "never"})
        r = await client.post("/agent", json={"message": "hi", "max_tokens": 100_000})
        assert r.status_code == 200
        assert upstream.requests()[-1]["body"]["max_tokens"] == 100, "max_tokens is capped"
        sid = r.json()["session_id"]
        assert (await client.post("/agent", json={"message": "two", "session_id": sid})).status_code == 200
        r = await client.post("/agent", json={"message": "three", "session_id": sid})
        assert r.status_code == 413 and r.json()["error"]["code"] == "session_full"
        assert len(upstream.requests()) == 2

    async with websockets.connect(f"{server.ws_url}/agent/ws", max_size=None) as ws:
        await ws.send(json.dumps({"type": "message", "message": "m" * 600}))
        assert json.loads(await ws.recv())["code"] == "message_too_long"
        await ws.send(json.dumps({"type": "message", "message": "m" * 3000}))
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_client_system_prompt_allowed_by_default(shared_server, upstream):
    upstream.script({"text": "ok"})
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "hi", "system": "Answer in French."})
        assert r.status_code == 200
    system = upstream.requests()[-1]["body"]["system"]
    assert "Answer in French." in json.dumps(system)


# -- secrets ------------------------------------------------------------------------------
async def test_secrets_never_leak(start_server, upstream):
    key, wrong = new_key(), "wrong-" + secrets.token_hex(16)
    hashed = new_key()
    server = start_server(AGENT_API_KEYS=f"{key},sha256:{hashlib.sha256(hashed.encode()).hexdigest()}",
                          LOG_LEVEL="DEBUG", RATE_LIMIT_RPM=0)
    seen: list[str] = []
    upstream.script({"text": "fine"}, {"status": 401}, {"status": 500}, {"text": "ws"})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for headers in (auth(key), auth(wrong), auth(hashed), {"Authorization": wrong}, {}):
            for method, path in ENDPOINTS[:3]:
                r = await client.request(method, path, headers=headers, json={"message": "hi"})
                seen.append(r.text + json.dumps(dict(r.headers)))
        r = await client.post("/ws-ticket", headers=auth(key))
        seen.append(r.text)
        ticket = r.json()["ticket"]
    async with websockets.connect(f"{server.ws_url}/agent/ws", subprotocols=["agent", f"bearer.{key}"]) as ws:
        seen.append(json.dumps(await ws_turn(ws, "hi")))
    for kwargs in ({"subprotocols": ["agent", f"bearer.{wrong}"]}, {"additional_headers": auth(key)},
                   {"additional_headers": {"Authorization": wrong}}):
        seen.append(json.dumps(await ws_status(f"{server.ws_url}/agent/ws", **kwargs)))
    seen.append(json.dumps(await ws_status(f"{server.ws_url}/agent/ws?ticket={ticket}")))
    await asyncio.sleep(0.3)
    log = server.log_path.read_text(errors="replace")
    assert principal(key) in log, "logs name the principal"
    assert ticket not in log, "access logs do not keep the ticket"
    for secret in (key, wrong, hashed, UPSTREAM_KEY, UPSTREAM_KEY[-12:]):
        assert secret not in log, f"{secret[:8]}... leaked into the server log"
        for text in seen:
            assert secret not in text, f"{secret[:8]}... leaked into a response"
    assert not re.search(r"sk-ant-[A-Za-z0-9-]{10,}", "".join(seen))


# -- logs and origins ---------------------------------------------------------------------
KEY_L = new_key()


@pytest.fixture(scope="module")
def logged(fake, redis_url):
    """A keyed server logging at DEBUG (the most talkative level operators use)."""
    env = server_env(fake, redis_url, AGENT_API_KEYS=KEY_L, ALLOWED_ORIGINS=ORIGIN, LOG_LEVEL="DEBUG",
                     RATE_LIMIT_RPM=0, RATE_LIMIT_TPM=0, MAX_CONCURRENT_STREAMS_PER_PRINCIPAL=0)
    server = Server(env, name="logged").start()
    yield server
    server.stop()


def log_size(server: Server) -> int:
    return server.log_path.stat().st_size


async def log_since(server: Server, offset: int) -> str:
    await asyncio.sleep(0.3)  # (the worker writes its lines unbuffered; give it a moment)
    with open(server.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def test_query_string_credentials_are_redacted_in_every_log_line(logged):
    secrets_ = {name: f"{name.upper()}-{secrets.token_hex(8)}"
                for name in ("key", "api_key", "Token", "ACCESS_TOKEN", "authorization", "ticket", "apiKey")}
    query = "&".join(f"{name}={value}" for name, value in secrets_.items()) + "&session_hint=visible-value"
    offset = log_size(logged)
    async with httpx.AsyncClient(base_url=logged.url, timeout=30) as client:
        assert (await client.get(f"/sessions/{SID}?{query}", headers=auth(KEY_L))).status_code == 404
        assert (await client.get(f"/sessions/{SID}?{query}")).status_code == 401
    assert (await ws_status(f"{logged.ws_url}/agent/ws?{query}", additional_headers=auth(KEY_L)))[0] == 101
    assert (await ws_status(f"{logged.ws_url}/agent/ws?{query}"))[0] == 401
    log = await log_since(logged, offset)
    # The access lines (JSON, never the query string) and websockets' DEBUG handshake lines (redacted).
    assert f'"path": "/sessions/{SID}"' in log and "/agent/ws?" in log, "the lines are there"
    for value in secrets_.values():
        assert value not in log, f"{value} leaked into the server log"
    assert "key=<redacted>" in log and "visible-value" in log, "only credential values are blanked"


async def test_refused_websocket_handshakes_are_not_errors(logged):
    offset = log_size(logged)
    refused = [
        (f"{logged.ws_url}/agent/ws", {}),
        (f"{logged.ws_url}/agent/ws?ticket=forged.ticket", {}),
        (f"{logged.ws_url}/agent/ws", {"subprotocols": ["agent", "bearer.wrong-key-0123456789"]}),
        (f"{logged.ws_url}/agent/ws", {"origin": EVIL, "additional_headers": auth(KEY_L)}),
        (f"{logged.ws_url}/api/chat/ws", {}),
    ]
    for url, kwargs in refused:
        assert (await ws_status(url, **kwargs))[0] in (401, 403)
    log = await log_since(logged, offset)
    assert '"WebSocket /agent/ws" 401' in log and '"WebSocket /agent/ws" 403' in log, "refusals are logged"
    errors = [line for line in log.splitlines() if line.startswith("ERROR") or '"level": "error"' in line]
    assert errors == []


async def test_websocket_message_contents_are_never_logged(logged, upstream):
    said, answered = f"PRIVATE-{secrets.token_hex(8)}", f"ANSWER-{secrets.token_hex(8)}"
    upstream.script({"text": f"{answered} rest of the answer"}, {"text": f"{answered} again"})
    offset = log_size(logged)
    async with websockets.connect(f"{logged.ws_url}/agent/ws", subprotocols=["agent", f"bearer.{KEY_L}"]) as ws:
        events = await ws_turn(ws, said)
        assert events[-1]["type"] == "turn_end" and answered in events[-1]["text"]
    async with websockets.connect(f"{logged.ws_url}/api/chat/ws", subprotocols=["agent", f"bearer.{KEY_L}"]) as ws:
        await ws.send(json.dumps({"type": "send", "requestId": "r1", "id": f"chat-{secrets.token_hex(6)}",
                                  "trigger": "submit-message", "messages": [
                                      {"id": "m1", "role": "user", "parts": [{"type": "text", "text": said}]}]}))
        while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "end":
            pass
    log = await log_since(logged, offset)
    assert said not in log and answered not in log
    assert "< TEXT [" in log and "> TEXT [" in log, "frames are still logged at DEBUG, without payload"


async def test_same_origin_means_same_scheme_host_and_port(start_server, upstream):
    allowed = "https://app.example:8443"
    server = start_server(ALLOWED_ORIGINS=allowed)  # no keys: the Origin is checked on HTTP too
    port = server.port
    https_self, other_port = f"https://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    behind_tls = {"X-Forwarded-Proto": "https"}  # from a trusted proxy (FORWARDED_ALLOW_IPS: loopback)

    async def status(origin: str, **headers: str) -> int:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return (await client.get(f"/sessions/{SID}", headers={"Origin": origin, **headers})).status_code

    assert await status(server.url) == 404, "the server's own origin"
    assert await status(https_self) == 403, "same host:port, other scheme"
    assert await status(other_port) == 403
    assert await status(https_self, **behind_tls) == 404, "the scheme the proxy was reached by"
    assert await status(server.url, **behind_tls) == 403
    assert await status(allowed) == 404 and await status("https://APP.example:8443/") == 404
    for foreign in ("http://app.example:8443", "https://app.example", "https://app.example:443", "null"):
        assert await status(foreign) == 403, foreign
    url = f"{server.ws_url}/agent/ws"
    assert (await ws_status(url, origin=server.url))[0] == 101
    assert (await ws_status(url, origin=https_self))[0] == 403
    assert (await ws_status(url, origin=https_self, additional_headers=behind_tls))[0] == 101
    assert (await ws_status(url, origin=server.url, additional_headers=behind_tls))[0] == 403
    assert (await ws_status(url, origin=allowed))[0] == 101
    assert (await ws_status(url, origin="http://app.example:8443"))[0] == 403
