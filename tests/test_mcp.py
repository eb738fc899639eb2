"""MCP servers (MCP_SERVERS): the agent server (real uvicorn workers, the fake Anthropic, Redis)
with the test MCP server of tests/mcp_server.py, a real process written with the `mcp` SDK's
server API, over stdio (the agent's worker starts it) and over streamable HTTP (uvicorn in a
subprocess). Nothing of the SDK or the protocol is mocked."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from httpx_sse import aconnect_sse

from server.tools.mcp_config import parse_mcp_servers

from .harness import ROOT, eventually, free_port, sse_turn

MCP_SERVER = str(ROOT / "tests" / "mcp_server.py")
LONG_NAME = "a_tool_with_a_name_much_longer_than_the_messages_api_would_ever_accept_from_us"
API_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def stdio(state: Path, **extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [MCP_SERVER], "env": {"MCP_TEST_STATE": str(state)}, **extra}


def pids(state: Path) -> set[int]:
    return {int(p.name[4:]) for p in state.glob("pid-*")}


def events_log(state: Path) -> str:
    try:
        return (state / "events.log").read_text()
    except FileNotFoundError:
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """Where a stdio test server writes its pid files and events."""
    path = tmp_path / "stdio"
    path.mkdir()
    return path


def start_http_mcp(port: int, state: Path) -> subprocess.Popen[bytes]:
    """The test MCP server over streamable HTTP on `port`, once it accepts connections."""
    proc = subprocess.Popen([sys.executable, MCP_SERVER, "--http", str(port)], cwd=ROOT,
                            env={**os.environ, "MCP_TEST_STATE": str(state)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the HTTP MCP server did not start")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def http_mcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The test MCP server over streamable HTTP: (its URL, its state directory)."""
    state = tmp_path_factory.mktemp("http")
    port = free_port()
    proc = start_http_mcp(port, state)
    yield f"http://127.0.0.1:{port}/mcp", state
    proc.terminate()
    proc.wait(10)


def mcp_env(servers: dict[str, Any], **env: Any) -> dict[str, Any]:
    return {"MCP_SERVERS": json.dumps({"mcpServers": servers}), **env}


def tool_results(request: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The tool_result blocks a model call was sent (in its last message), by tool_use id."""
    content = request["body"]["messages"][-1]["content"]
    return {b["tool_use_id"]: {k: v for k, v in b.items() if k != "cache_control"}
            for b in content if b["type"] == "tool_result"}


def ready(server: Any) -> dict[str, Any]:
    r = httpx.get(server.url + "/ready", timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def metric(agent: Any, name: str, **labels: str) -> float | None:
    text = httpx.get(agent.url + "/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.split()[-1])
    return None


async def run_turn(server: Any, message: str = "go") -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        return await sse_turn(client, {"message": message})


# -- end to end -----------------------------------------------------------------------------------
async def test_tools_over_stdio_and_http_reach_the_model_and_their_results_map(start_server, upstream, state,
                                                                              http_mcp):
    url, _ = http_mcp
    server = start_server(workers=2, **mcp_env({
        "files": stdio(state),
        "web": {"url": url, "headers": {"X-Test": "yes"}, "allowedTools": ["echo", "image", "add"]},
    }))
    # Every worker lists the tools at startup, with a stdio server process of its own.
    assert await eventually(lambda: len(pids(state)) == 2, timeout=20)
    await eventually(lambda: metric(server, "agent_mcp_server_up", server="files") == 1.0, timeout=20)
    assert ready(server)["mcp"] == {"files": {"state": "up", "tools": 11}, "web": {"state": "up", "tools": 3}}
    assert metric(server, "agent_mcp_server_up", server="files") == 1.0
    assert metric(server, "agent_mcp_server_up", server="web") == 1.0

    upstream.script({"tool_use": [
        {"name": "files__echo", "input": {"text": "hello"}, "id": "toolu_text"},
        {"name": "files__image", "input": {}, "id": "toolu_image"},
        {"name": "files__structured", "input": {}, "id": "toolu_structured"},
        {"name": "files__resource", "input": {}, "id": "toolu_resource"},
        {"name": "files__fail", "input": {}, "id": "toolu_fail"},
        {"name": "files__echo", "input": {"text": 7}, "id": "toolu_invalid"},
        {"name": "web__add", "input": {"a": 2, "b": 40}, "id": "toolu_http"},
        {"name": "web__image", "input": {}, "id": "toolu_http_image"},
    ]})
    events = await run_turn(server)
    assert events[-1]["type"] == "turn_end", events[-1]
    first, second = upstream.requests()

    # The tools the model was offered: local ones first, then each server's, namespaced; the
    # cache breakpoint on the last one (the tools are the start of every cached prefix).
    tools = first["body"]["tools"]
    names = [t["name"] for t in tools]
    assert names[:2] == ["calculator", "current_time"]
    assert names[2:13] == ["files__echo", "files__add", "files__image", "files__structured", "files__resource",
                           "files__fail", "files__slow", "files__add_tool", "files__crash", "files__dotted_name",
                           names[12]]
    assert names[13:] == ["web__echo", "web__add", "web__image"]  # the allow list, in the server's order
    assert all(API_NAME.match(n) for n in names)
    assert tools[-1]["cache_control"] == {"type": "ephemeral"}
    assert sum("cache_control" in t for t in tools) == 1
    echo = tools[2]
    assert echo["description"] == "Answer the text it was given."
    assert echo["input_schema"]["properties"]["text"]["type"] == "string"

    results = tool_results(second)
    pixel = results["toolu_image"]["content"]
    assert results["toolu_text"] == {"type": "tool_result", "tool_use_id": "toolu_text", "content": "hello"}
    assert pixel[0] == {"type": "text", "text": "a pixel"}
    assert pixel[1]["type"] == "image" and pixel[1]["source"]["type"] == "base64"
    assert pixel[1]["source"]["media_type"] == "image/png" and pixel[1]["source"]["data"].startswith("iVBOR")
    assert json.loads(results["toolu_structured"]["content"]) == {"temperature": 21.5, "unit": "C"}
    assert results["toolu_resource"]["content"] == "the notes"
    assert results["toolu_fail"] == {"type": "tool_result", "tool_use_id": "toolu_fail",
                                     "content": "the disk is full", "is_error": True}
    assert results["toolu_invalid"]["is_error"] is True
    assert "invalid input for tool 'files__echo'" in results["toolu_invalid"]["content"]
    assert results["toolu_http"]["content"] == "42" and "is_error" not in results["toolu_http"]
    assert results["toolu_http_image"]["content"][1]["source"]["media_type"] == "image/png"

    # The events say the same (tool_input validated by the tool's schema).
    inputs = {e["tool_use_id"]: e for e in events if e["type"] == "tool_input"}
    assert inputs["toolu_text"]["valid"] is True and inputs["toolu_invalid"]["valid"] is False
    outputs = {e["tool_use_id"]: e for e in events if e["type"] == "tool_result"}
    assert outputs["toolu_fail"]["is_error"] is True and outputs["toolu_fail"]["error"] == "the disk is full"
    assert outputs["toolu_http"]["output"] == "42"
    metrics_text = httpx.get(server.url + "/metrics", timeout=5).text
    assert 'agent_tool_calls_total{outcome="ok",tool="web__add"} 1.0' in metrics_text
    assert 'agent_tool_calls_total{outcome="error",tool="files__fail"} 1.0' in metrics_text


async def test_long_and_dotted_names_are_shortened_stably_and_call_the_right_tool(start_server, upstream, state):
    server = start_server(**mcp_env({"a-very-long-server-name": stdio(state, allowedTools=[LONG_NAME, "dotted.name"])}))
    upstream.script({"text": "hi"})
    await run_turn(server)
    names = [t["name"] for t in upstream.requests()[0]["body"]["tools"]]
    long_name = names[-1]
    assert names[-2] == "a-very-long-server-name__dotted_name"
    assert len(long_name) == 64 and API_NAME.match(long_name)
    assert long_name.startswith("a-very-long-server-name__a_tool_with_a_name_much_long")
    # Stable: derived from the names alone (the same in every worker and after restarts).
    from server.tools.mcp_config import tool_prefix
    import hashlib
    digest = hashlib.sha256(f"a-very-long-server-name\0{LONG_NAME}".encode()).hexdigest()[:8]
    assert long_name.endswith("_" + digest) and tool_prefix("a-very-long-server-name") == "a-very-long-server-name"

    upstream.reset()
    upstream.script({"tool_use": [{"name": long_name, "input": {}, "id": "toolu_long"},
                                  {"name": "a-very-long-server-name__dotted_name", "input": {}, "id": "toolu_dot"}]})
    await run_turn(server)
    results = tool_results(upstream.requests()[1])
    assert results["toolu_long"]["content"] == "long" and results["toolu_dot"]["content"] == "dotted"

    # A worker that stops stops its stdio servers.
    [pid] = pids(state)
    server.stop()  # (SIGTERM: drain, then the lifespan closes the MCP connections)
    assert await eventually(lambda: not alive(pid), timeout=5)


async def test_a_killed_stdio_server_is_a_tool_error_then_restarted(start_server, upstream, state):
    server = start_server(**mcp_env({"files": stdio(state)}))
    [pid] = pids(state)
    upstream.script({"tool_use": [{"name": "files__slow", "input": {"seconds": 30}, "id": "toolu_slow"}]})
    events = []
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        async with aconnect_sse(client, "POST", "/agent/stream", json={"message": "go"}) as source:
            async for s in source.aiter_sse():
                events.append(json.loads(s.data))
                if events[-1]["type"] == "tool_input":
                    time.sleep(0.3)  # (the call is on its way)
                    os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - started
    end = events[-1]
    assert end["type"] == "turn_end" and end["model_calls"] == 2, end
    assert took < 10
    [result] = [e for e in events if e["type"] == "tool_result"]
    assert result["is_error"] is True and result["error"].startswith("MCP server files is unavailable")
    sent = tool_results(upstream.requests()[1])["toolu_slow"]
    assert sent["is_error"] is True and "unavailable" in sent["content"]
    assert end["text"].startswith("The tool failed: MCP server files is unavailable")

    # Restarted with backoff (the first retry after 0.5 s): a new process, up again, tools unchanged.
    assert await eventually(lambda: len(pids(state)) == 2 and ready(server)["mcp"]["files"]["state"] == "up",
                            timeout=15)
    assert not alive(pid)
    assert ready(server)["mcp"]["files"] == {"state": "up", "tools": 11}
    upstream.reset()
    upstream.script({"tool_use": [{"name": "files__echo", "input": {"text": "back"}, "id": "toolu_back"}]})
    events = await run_turn(server)
    assert [e["output"] for e in events if e["type"] == "tool_result"] == ["back"]
    assert events[-1]["text"] == "The result is back."
    assert "MCP server files is down" in server.log()


async def test_an_http_server_that_goes_away_is_a_tool_error_then_reconnected(start_server, upstream, tmp_path):
    port = free_port()
    proc = start_http_mcp(port, tmp_path)
    try:
        server = start_server(**mcp_env({"web": {"url": f"http://127.0.0.1:{port}/mcp"}}))
        upstream.script({"tool_use": [{"name": "web__slow", "input": {"seconds": 30}, "id": "toolu_slow"}]})
        events = []
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async with aconnect_sse(client, "POST", "/agent/stream", json={"message": "go"}) as source:
                async for s in source.aiter_sse():
                    events.append(json.loads(s.data))
                    if events[-1]["type"] == "tool_input":
                        time.sleep(0.3)
                        proc.kill()
                        proc.wait()
        assert events[-1]["type"] == "turn_end"
        [result] = [e for e in events if e["type"] == "tool_result"]
        assert result["is_error"] is True and result["error"].startswith("MCP server web "), result
        assert await eventually(lambda: ready(server)["mcp"]["web"]["state"] == "down", timeout=10)
        assert ready(server)["mcp"]["web"]["tools"] == 11  # (still listed)
        proc = start_http_mcp(port, tmp_path)
        assert await eventually(lambda: ready(server)["mcp"]["web"]["state"] == "up", timeout=20)
        upstream.reset()
        upstream.script({"tool_use": [{"name": "web__echo", "input": {"text": "again"}, "id": "toolu_again"}]})
        events = await run_turn(server)
        assert [e.get("output") for e in events if e["type"] == "tool_result"] == ["again"], (events, server.log())
    finally:
        proc.kill()
        proc.wait()


async def test_while_down_its_tools_stay_listed_and_answer_an_error(start_server, upstream, state):
    server = start_server(**mcp_env({"files": stdio(state)}))
    upstream.script({"text": "hi"})
    await run_turn(server)
    tools_before = upstream.requests()[0]["body"]["tools"]
    # The `crash` tool makes the process exit without answering.
    upstream.reset()
    upstream.script({"tool_use": [{"name": "files__crash", "input": {}, "id": "toolu_crash"}]},
                    {"tool_use": [{"name": "files__echo", "input": {"text": "x"}, "id": "toolu_echo"}]})
    events = await run_turn(server)
    results = {e["tool_use_id"]: e for e in events if e["type"] == "tool_result"}
    assert results["toolu_crash"]["is_error"] and "unavailable" in results["toolu_crash"]["error"]
    # The next call came straight after, while the server was still down (or coming back up).
    assert events[-1]["type"] == "turn_end"
    state_now = ready(server)["mcp"]["files"]
    assert state_now["tools"] == 11
    requests = upstream.requests()
    assert requests[1]["body"]["tools"] == tools_before  # same definitions: the prompt cache holds
    if results["toolu_echo"]["is_error"]:
        assert "unavailable" in results["toolu_echo"]["error"]
    await eventually(lambda: ready(server)["mcp"]["files"]["state"] == "up", timeout=15)


async def test_tools_list_changed_refreshes_the_tools(start_server, upstream, state, http_mcp):
    url, http_state = http_mcp
    server = start_server(**mcp_env({"files": stdio(state), "web": {"url": url, "allowedTools": ["add_tool", "fresh"]}}))
    assert ready(server)["mcp"]["web"]["tools"] == 1
    upstream.script({"tool_use": [{"name": "files__add_tool", "input": {"name": "fresh"}, "id": "toolu_add"},
                                  {"name": "web__add_tool", "input": {"name": "fresh"}, "id": "toolu_add_http"}]})
    await run_turn(server)
    await eventually(lambda: ready(server)["mcp"]["files"]["tools"] == 12 and ready(server)["mcp"]["web"]["tools"] == 2,
                     timeout=10)
    upstream.reset()
    upstream.script({"tool_use": [{"name": "files__fresh", "input": {"text": "hi"}, "id": "toolu_fresh"},
                                  {"name": "web__fresh", "input": {"text": "there"}, "id": "toolu_fresh_http"}]})
    await run_turn(server)
    first, second = upstream.requests()
    names = [t["name"] for t in first["body"]["tools"]]
    assert "files__fresh" in names and names[-2:] == ["web__add_tool", "web__fresh"]
    assert first["body"]["tools"][-1].get("cache_control") == {"type": "ephemeral"}
    results = tool_results(second)
    assert results["toolu_fresh"]["content"] == "fresh: hi"
    assert results["toolu_fresh_http"]["content"] == "fresh: there"


async def test_a_call_past_its_timeout_is_cancelled_on_the_server(start_server, upstream, state):
    server = start_server(**mcp_env({"files": stdio(state, timeout=0.5)}))
    upstream.script({"tool_use": [{"name": "files__slow", "input": {"seconds": 20, "tag": "t1"}, "id": "toolu_t"}]})
    started = time.monotonic()
    events = await run_turn(server)
    assert time.monotonic() - started < 8
    [result] = [e for e in events if e["type"] == "tool_result"]
    assert result["is_error"] and result["error"] == "tool 'files__slow' timed out after 0.5 s"
    assert await eventually(lambda: "cancelled t1" in events_log(state), timeout=5)
    # The connection is still good.
    upstream.reset()
    upstream.script({"tool_use": [{"name": "files__slow", "input": {"seconds": 0.01}, "id": "toolu_quick"}]})
    events = await run_turn(server)
    assert [e.get("output") for e in events if e["type"] == "tool_result"] == ["slept 0.01"]


async def test_cancelling_the_turn_cancels_the_mcp_call(start_server, upstream, state, http_mcp):
    url, http_state = http_mcp
    server = start_server(**mcp_env({"files": stdio(state), "web": {"url": url}}))
    upstream.script({"tool_use": [{"name": "files__slow", "input": {"seconds": 30, "tag": "c1"}, "id": "toolu_c1"},
                                  {"name": "web__slow", "input": {"seconds": 30, "tag": "c2"}, "id": "toolu_c2"}]})
    events = []
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        async with aconnect_sse(client, "POST", "/agent/stream", json={"message": "go"}) as source:
            session_id = source.response.headers["x-session-id"]
            async for s in source.aiter_sse():
                events.append(json.loads(s.data))
                if events[-1]["type"] == "tool_input" and events[-1]["tool_use_id"] == "toolu_c2":
                    r = await client.post(f"/sessions/{session_id}/cancel")
                    assert r.status_code == 202
    assert events[-1]["type"] == "turn_end" and events[-1]["cancelled"] is True
    assert time.monotonic() - started < 10
    assert await eventually(lambda: "cancelled c1" in events_log(state), timeout=5)
    assert await eventually(lambda: "cancelled c2" in events_log(http_state), timeout=5)
    assert ready(server)["mcp"]["files"]["state"] == "up"


async def test_a_server_that_cannot_start_is_reported_not_fatal(start_server, upstream, state, tmp_path):
    server = start_server(MCP_CONNECT_TIMEOUT_SECONDS="3", **mcp_env({
        "files": stdio(state),
        "missing": {"command": str(tmp_path / "no-such-program")},
        "refused": {"url": f"http://127.0.0.1:{free_port()}/mcp"},
        "silent": {"command": "sleep", "args": ["60"]},  # (never answers `initialize`)
        "off": {"command": "whatever", "disabled": True},
    }))
    mcp = ready(server)["mcp"]
    assert mcp["silent"] == {"state": "down", "tools": 0, "error": "no answer in time"}
    assert mcp["files"] == {"state": "up", "tools": 11}
    assert mcp["missing"]["state"] == "down" and "FileNotFoundError" in mcp["missing"]["error"]
    assert mcp["refused"]["state"] == "down" and mcp["refused"]["tools"] == 0
    assert "off" not in mcp
    assert metric(server, "agent_mcp_server_up", server="missing") == 0.0
    assert metric(server, "agent_mcp_server_up", server="files") == 1.0
    upstream.script({"tool_use": [{"name": "files__add", "input": {"a": 1, "b": 2}, "id": "toolu_ok"}]})
    events = await run_turn(server)
    assert [e.get("output") for e in events if e["type"] == "tool_result"] == ["3"]
    assert "MCP server missing is down" in server.log()


# -- configuration --------------------------------------------------------------------------------
BAD_CONFIGS = [
    ('{"mcpServers": []}', r'expected \{"mcpServers"'),
    ('{"mcpServers": {"a": {"command": "x"}}, "extra": 1}', r"unknown top-level key 'extra'"),
    ('{"mcpServers": {"a": {}}}', r"server 'a': give either \"command\" \(stdio\) or \"url\""),
    ('{"mcpServers": {"a": {"command": "x", "url": "http://h"}}}', r"server 'a': give either"),
    ('{"mcpServers": {"a": {"command": ""}}}', r"server 'a': key 'command' must be a non-empty string"),
    ('{"mcpServers": {"a": {"command": "x", "args": "y"}}}', r"server 'a': key 'args' must be a list of strings"),
    ('{"mcpServers": {"a": {"command": "x", "env": {"K": 1}}}}', r"server 'a': key 'env' must be an object of strings"),
    ('{"mcpServers": {"a": {"command": "x", "headers": {}}}}', r"server 'a': key 'headers' does not apply to a stdio"),
    ('{"mcpServers": {"a": {"url": "ftp://h"}}}', r"server 'a': key 'url' must be an http"),
    ('{"mcpServers": {"a": {"url": "http://h", "type": "sse"}}}', r"server 'a': key \"type\" .*SSE is not supported"),
    ('{"mcpServers": {"a": {"command": "x", "timeout": 0}}}', r"server 'a': key 'timeout' must be a number"),
    ('{"mcpServers": {"a": {"command": "x", "allowedTools": "echo"}}}', r"server 'a': key 'allowedTools' must be a list"),
    ('{"mcpServers": {"a": {"command": "x", "disabled": "yes"}}}', r"server 'a': key 'disabled' must be true or false"),
    ('{"mcpServers": {"a": {"command": "x", "allowed_tools": []}}}', r"server 'a': unknown key 'allowed_tools'"),
    ('{"mcpServers": {"a": {"command": "x", "env": {"T": "${MCP_TEST_UNSET_VAR}"}}}}',
     r"server 'a': key 'env' \(T\): environment variable MCP_TEST_UNSET_VAR is not set"),
    ('{"mcpServers": {"a.b": {"command": "x"}, "a_b": {"command": "y"}}}', r"servers 'a.b' and 'a_b' give the same"),
    ('{"mcpServers": {"a": {"command": "x"}', r"invalid JSON in inline JSON: .* line 1"),
    ('/nonexistent/mcp.json', r"cannot read '/nonexistent/mcp.json'"),
]


@pytest.mark.parametrize("raw, message", BAD_CONFIGS)
def test_bad_configs_name_the_server_and_key(raw: str, message: str):
    with pytest.raises(ValueError, match=message):
        parse_mcp_servers(raw, environ={})


def test_a_config_file_with_variables(tmp_path: Path):
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "gh": {"url": "https://api.example.com/mcp", "headers": {"Authorization": "Bearer ${GH_TOKEN}"},
               "timeout": 30, "allowedTools": ["search"]},
        "fs": {"type": "stdio", "command": "npx", "args": ["-y", "server-fs", "${HOME_DIR:-/srv}"], "cwd": "/tmp"},
    }}))
    servers = parse_mcp_servers(str(path), environ={"GH_TOKEN": "s3cret"})
    gh, fs = servers["gh"], servers["fs"]
    assert gh.transport == "http" and gh.headers == {"Authorization": "Bearer s3cret"}
    assert gh.timeout == 30.0 and gh.allowed_tools == frozenset({"search"})
    assert fs.transport == "stdio" and fs.args == ("-y", "server-fs", "/srv") and fs.cwd == "/tmp"
    assert fs.timeout is None and fs.allowed_tools is None and not fs.disabled


@pytest.mark.parametrize("raw, message", [
    ('{"mcpServers": {"files": {"command": "x", "timeout": -1}}}',
     r"configuration error: MCP_SERVERS: server 'files': key 'timeout' must be a number"),
    ("/nonexistent/mcp.json", r"configuration error: MCP_SERVERS: cannot read '/nonexistent/mcp.json'"),
])
def test_a_bad_config_stops_startup_with_exit_code_2(raw: str, message: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "REDIS_"))}
    env.update(MCP_SERVERS=raw, PORT="0")
    proc = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert re.search(message, proc.stderr), proc.stderr


def test_importing_the_app_without_mcp_servers_does_not_import_mcp():
    code = "import sys, server.app; print('mcp' in sys.modules, 'server.tools.mcp' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "MCP_SERVERS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.split() == ["False", "False"], out.stderr


async def test_an_mcp_tool_can_require_approval(start_server, upstream, state):
    """TOOLS_REQUIRING_APPROVAL names MCP tools by their namespaced name: the call waits for the
    decision like any tool's, and only then goes to the MCP server."""
    agent = start_server(**mcp_env({"files": stdio(state)}, TOOLS_REQUIRING_APPROVAL="files__echo"))
    upstream.script({"tool_use": [{"name": "files__echo", "input": {"text": "hello"}, "id": "toolu_mcp"}]})
    async with httpx.AsyncClient(base_url=agent.url, timeout=60) as client:
        waiting = await client.post("/agent", json={"message": "echo hello"})
        assert waiting.status_code == 202, waiting.text
        assert waiting.json()["pending"][0]["name"] == "files__echo"
        sid = waiting.json()["session_id"]
        decided = await client.post(f"/sessions/{sid}/tool-approvals", json={"tool_use_id": "toolu_mcp",
                                                                             "approved": True})
        assert decided.status_code == 202
        async with aconnect_sse(client, "GET", f"/sessions/{sid}/stream") as source:
            events = [json.loads(s.data) async for s in source.aiter_sse()]
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["output"] == "hello" and events[-1]["type"] == "turn_end"
    assert tool_results(upstream.requests()[1])["toolu_mcp"]["content"] == "hello"
