"""Configuration: defaults, and an invalid value stops startup naming the variable."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ConfigError, Settings, env_defaults
from server.tools import server_tools

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_offline_and_in_memory():
    s = Settings.from_env({})
    assert s.offline and s.redis_url is None
    assert (s.host, s.port, s.web_concurrency) == ("127.0.0.1", 8000, 1)
    assert s.default_model in s.allowed_models


@pytest.mark.parametrize("env,variable", [
    ({"PORT": "eighty"}, "PORT"),
    ({"PORT": "70000"}, "PORT"),
    ({"ANTHROPIC_MAX_RETRIES": "-1"}, "ANTHROPIC_MAX_RETRIES"),
    ({"ANTHROPIC_BASE_URL": "ftp://x"}, "ANTHROPIC_BASE_URL"),
    ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
    ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
    ({"MAX_OUTPUT_TOKENS": "lots"}, "MAX_OUTPUT_TOKENS"),
    ({"SESSION_TTL_SECONDS": "5"}, "SESSION_TTL_SECONDS"),
    ({"PROMPT_CACHING": "maybe"}, "PROMPT_CACHING"),
    ({"ENABLED_TOOLS": "calculator,web_search"}, "ENABLED_TOOLS"),
    ({"TOOLS_REQUIRING_APPROVAL": "calculater"}, "TOOLS_REQUIRING_APPROVAL"),
    ({"TOOLS_REQUIRING_APPROVAL": "web_search", "SERVER_TOOLS": "web_search"}, "TOOLS_REQUIRING_APPROVAL"),
    ({"TOOLS_REQUIRING_APPROVAL": "docs__read", "MCP_SERVERS": '{"mcpServers": {"files": {"command": "x"}}}'},
     "TOOLS_REQUIRING_APPROVAL"),
    ({"DEFAULT_MODEL": "claude-x", "ALLOWED_MODELS": "claude-y"}, "DEFAULT_MODEL"),
    ({"MODEL_PRICES": "{not json"}, "MODEL_PRICES"),
    ({"MODEL_PRICES": '{"m": {"input": 1}}'}, "MODEL_PRICES"),
    ({"EVENT_LOG_FLUSH_MS": "500"}, "EVENT_LOG_FLUSH_MS"),
    ({"THINKING_BUDGET_TOKENS": "1023"}, "THINKING_BUDGET_TOKENS"),
    ({"THINKING_BUDGET_TOKENS": "4096"}, "THINKING_BUDGET_TOKENS"),  # not below MAX_OUTPUT_TOKENS (4096)
    ({"THINKING_BUDGET_TOKENS": "2048", "MAX_OUTPUT_TOKENS": "2000"}, "THINKING_BUDGET_TOKENS"),
    ({"THINKING_BUDGET_TOKENS": "lots"}, "THINKING_BUDGET_TOKENS"),
    ({"THINKING_BUDGET_TOKENS": "2048", "THINKING_ADAPTIVE": "true"}, "THINKING_ADAPTIVE"),
    ({"THINKING_DISPLAY": "full", "THINKING_ADAPTIVE": "true"}, "THINKING_DISPLAY"),
    ({"THINKING_DISPLAY": "omitted"}, "THINKING_DISPLAY"),  # without a thinking config to shape
    ({"THINKING_EFFORT": "extreme"}, "THINKING_EFFORT"),
    ({"ALLOW_CLIENT_THINKING": "sometimes"}, "ALLOW_CLIENT_THINKING"),
    ({"SERVER_TOOLS": "web_search,browser"}, "SERVER_TOOLS"),
    ({"SERVER_TOOLS": "web_search_20990101"}, "SERVER_TOOLS"),
    ({"SERVER_TOOLS": "web_search,web_search_20260318"}, "SERVER_TOOLS"),  # two versions of one tool
    ({"WEB_SEARCH_MAX_USES": "-1"}, "WEB_SEARCH_MAX_USES"),
    ({"WEB_SEARCH_ALLOWED_DOMAINS": "https://example.com"}, "WEB_SEARCH_ALLOWED_DOMAINS"),
    ({"WEB_SEARCH_ALLOWED_DOMAINS": "a.com", "WEB_SEARCH_BLOCKED_DOMAINS": "b.com"}, "WEB_SEARCH_BLOCKED_DOMAINS"),
    ({"WEB_FETCH_ALLOWED_DOMAINS": "a.com", "WEB_FETCH_BLOCKED_DOMAINS": "b.com"}, "WEB_FETCH_BLOCKED_DOMAINS"),
    ({"WEB_SEARCH_USER_LOCATION": "Paris"}, "WEB_SEARCH_USER_LOCATION"),
    ({"WEB_SEARCH_USER_LOCATION": '["Paris"]'}, "WEB_SEARCH_USER_LOCATION"),
    ({"WEB_SEARCH_USER_LOCATION": "{}"}, "WEB_SEARCH_USER_LOCATION"),
    ({"WEB_SEARCH_USER_LOCATION": '{"city": "Paris", "street": "Rue X"}'}, "WEB_SEARCH_USER_LOCATION"),
    ({"WEB_SEARCH_USER_LOCATION": '{"type": "approximate", "city": "Paris"}'}, "WEB_SEARCH_USER_LOCATION"),
    ({"WEB_SEARCH_USER_LOCATION": '{"city": 75}'}, "WEB_SEARCH_USER_LOCATION"),
    ({"WEB_SEARCH_USER_LOCATION": '{"country": "FRA"}'}, "WEB_SEARCH_USER_LOCATION"),
    ({"WEB_SEARCH_USER_LOCATION": '{"timezone": "Mars/Olympus_Mons"}'}, "WEB_SEARCH_USER_LOCATION"),
    ({"WEB_FETCH_MAX_CONTENT_TOKENS": "-5"}, "WEB_FETCH_MAX_CONTENT_TOKENS"),
    ({"WEB_FETCH_CITATIONS": "2"}, "WEB_FETCH_CITATIONS"),
    ({"WEB_SEARCH_PRICE_PER_1K": "-1"}, "WEB_SEARCH_PRICE_PER_1K"),
    ({"MAX_DOCUMENT_BYTES": "100"}, "MAX_DOCUMENT_BYTES"),
    ({"MAX_DOCUMENT_PAGES": "0"}, "MAX_DOCUMENT_PAGES"),
    ({"MAX_DOCUMENTS": "101"}, "MAX_DOCUMENTS"),
])
def test_invalid_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=rf"^{variable}:"):
        Settings.from_env(env)


def test_several_workers_need_redis():
    with pytest.raises(ConfigError, match="WEB_CONCURRENCY"):
        Settings.from_env({"WEB_CONCURRENCY": "2"})
    assert Settings.from_env({"WEB_CONCURRENCY": "2", "REDIS_URL": "redis://127.0.0.1:6379/0"}).web_concurrency == 2


def test_price_table_override():
    s = Settings.from_env({"MODEL_PRICES": '{"my-model": {"input": 1, "output": 2, "cache_write": 1.25, "cache_read": 0.1}}',
                           "ALLOWED_MODELS": "my-model", "DEFAULT_MODEL": "my-model"})
    assert s.model_prices["my-model"]["output"] == 2.0 and s.allowed_models == ("my-model",)


def test_startup_refuses_a_bad_value_with_its_name():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "REDIS_"))}
    env.update(WEB_CONCURRENCY="3", PORT="0")
    proc = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert re.search(r"configuration error: WEB_CONCURRENCY: .*REDIS_URL", proc.stderr)


def test_env_example_documents_every_variable():
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    read = {name for name, _default in env_defaults()}
    assert read - documented == set(), "variables read by config.py but missing from .env.example"


def test_procfile_matches_the_graceful_shutdown_and_bind_settings():
    """uvicorn must wait longer than GRACEFUL_SHUTDOWN_SECONDS so streams can carry their last
    event, and HOST must say what --host binds so the no-key check sees a public bind."""
    line = (ROOT / "Procfile").read_text().strip()
    assert line.startswith("web: HOST=0.0.0.0 uvicorn server.app:app --host 0.0.0.0 --port $PORT")
    timeout = int(re.search(r"--timeout-graceful-shutdown (\d+)", line).group(1))
    assert timeout > Settings.from_env({"AUTH_DISABLED": "true"}).graceful_shutdown_seconds
    assert "--ws-per-message-deflate false" in line
    with pytest.raises(ConfigError, match="AGENT_API_KEYS"):
        Settings.from_env({"HOST": "0.0.0.0"})


def test_readme_configuration_table_lists_every_variable():
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    readme = (ROOT / "README.md").read_text()
    assert {v for v in documented if f"| `{v}` |" not in readme} == set()


# -- thinking and server tools (issue #16) ---------------------------------------------------------
def test_thinking_and_server_tool_defaults_are_off():
    s = Settings.from_env({})
    assert (s.thinking_budget_tokens, s.thinking_adaptive, s.thinking_display, s.thinking_effort) == (0, False, "", "")
    assert (s.thinking_interleaved, s.allow_client_thinking, s.server_tools) == (False, True, ())
    assert (s.max_document_bytes, s.max_document_pages, s.max_documents) == (8 * 1024 * 1024, 100, 5)
    assert s.web_search_price_per_1k == 10.0 and s.web_search_user_location is None
    assert server_tools.definitions(s) == []


def test_valid_thinking_settings():
    s = Settings.from_env({"THINKING_BUDGET_TOKENS": "1024", "THINKING_DISPLAY": "Omitted", "THINKING_EFFORT": "HIGH",
                           "THINKING_INTERLEAVED": "true"})
    assert (s.thinking_budget_tokens, s.thinking_display, s.thinking_effort) == (1024, "omitted", "high")
    s = Settings.from_env({"THINKING_ADAPTIVE": "true", "THINKING_DISPLAY": "summarized", "THINKING_EFFORT": "xhigh"})
    assert s.thinking_adaptive and s.thinking_display == "summarized"
    s = Settings.from_env({"THINKING_BUDGET_TOKENS": "31999", "MAX_OUTPUT_TOKENS": "32000"})
    assert s.thinking_budget_tokens == 31999


def test_unknown_server_tool_lists_the_valid_ones():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"SERVER_TOOLS": "web_search,browser"})
    message = str(caught.value)
    assert message.startswith("SERVER_TOOLS: unknown server tool 'browser'; valid: web_search, web_fetch, "
                              "code_execution, ")
    assert all(version in message for version in server_tools.KNOWN_TYPES)


def test_server_tools_resolve_to_versioned_types_in_order():
    s = Settings.from_env({"SERVER_TOOLS": "code_execution, web_fetch_20260318,web_search,web_search"})
    assert s.server_tools == ("code_execution_20250825", "web_fetch_20260318", "web_search_20250305")
    assert server_tools.definitions(s) == [
        {"type": "code_execution_20250825", "name": "code_execution"},
        {"type": "web_fetch_20260318", "name": "web_fetch"},
        {"type": "web_search_20250305", "name": "web_search"},
    ]


def test_server_tool_definitions_carry_only_the_options_set():
    s = Settings.from_env({
        "SERVER_TOOLS": "web_search_20260318,web_fetch", "WEB_SEARCH_MAX_USES": "5",
        "WEB_SEARCH_ALLOWED_DOMAINS": "example.com, docs.example.org/api",
        "WEB_SEARCH_USER_LOCATION": '{"timezone": "Europe/Paris", "city": "Paris", "country": "FR", "region": "IDF"}',
        "WEB_FETCH_MAX_USES": "2", "WEB_FETCH_BLOCKED_DOMAINS": "evil.example", "WEB_FETCH_MAX_CONTENT_TOKENS": "5000",
        "WEB_FETCH_CITATIONS": "true",
    })
    assert server_tools.definitions(s) == [
        {"type": "web_search_20260318", "name": "web_search", "max_uses": 5,
         "allowed_domains": ["example.com", "docs.example.org/api"],
         "user_location": {"type": "approximate", "city": "Paris", "region": "IDF", "country": "FR",
                           "timezone": "Europe/Paris"}},
        {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 2, "blocked_domains": ["evil.example"],
         "max_content_tokens": 5000, "citations": {"enabled": True}},
    ]
    # Options of a tool that is not enabled are not sent anywhere; WEB_FETCH_CITATIONS=false sends nothing.
    s = Settings.from_env({"SERVER_TOOLS": "web_fetch", "WEB_SEARCH_MAX_USES": "5", "WEB_FETCH_CITATIONS": "false"})
    assert server_tools.definitions(s) == [{"type": "web_fetch_20250910", "name": "web_fetch"}]


SDK_TYPES = Path(importlib.util.find_spec("anthropic").origin).parent / "types"  # (read, not imported)
FAMILY_OPTIONS = {"web_search": {"max_uses", "allowed_domains", "blocked_domains", "user_location"},
                  "web_fetch": {"max_uses", "allowed_domains", "blocked_domains", "max_content_tokens", "citations"},
                  "code_execution": set()}


def test_known_server_tool_versions_are_the_pinned_sdks():
    """server_tools.KNOWN_TYPES is written out (importing the SDK's type modules at startup costs
    cold-start time); it must be exactly the web search, web fetch and code execution versions of
    the pinned SDK's ToolUnionParam, and each must take the options definitions() sends."""
    union = (SDK_TYPES / "tool_union_param.py").read_text()
    found = {}
    for path in SDK_TYPES.glob("*_tool_2*_param.py"):
        family = path.name.split("_tool_")[0]
        if family not in FAMILY_OPTIONS:
            continue
        text = path.read_text()
        tool_type = re.search(r'type: Required\[Literal\["(\w+)"\]\]', text).group(1)
        assert f"from .{path.stem} import" in union, f"{path.name} is not in ToolUnionParam"
        assert re.search(rf'name: Required\[Literal\["{family}"\]\]', text)
        fields = set(re.findall(r"^    (\w+):", text, re.M))
        assert FAMILY_OPTIONS[family] <= fields, (tool_type, FAMILY_OPTIONS[family] - fields)
        found[tool_type] = family
    assert sorted(server_tools.KNOWN_TYPES) == sorted(found)
    assert set(server_tools.DEFAULT_TYPES.values()) <= set(found)
    assert all(server_tools.tool_name(t) == family for t, family in found.items())


def test_server_tools_module_does_not_import_the_sdk():
    code = "import sys, server.config, server.tools.server_tools; print('anthropic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr
