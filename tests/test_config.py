"""Configuration: defaults, and an invalid value stops startup naming the variable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ConfigError, Settings, env_defaults

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
    ({"DEFAULT_MODEL": "claude-x", "ALLOWED_MODELS": "claude-y"}, "DEFAULT_MODEL"),
    ({"MODEL_PRICES": "{not json"}, "MODEL_PRICES"),
    ({"MODEL_PRICES": '{"m": {"input": 1}}'}, "MODEL_PRICES"),
    ({"EVENT_LOG_FLUSH_MS": "500"}, "EVENT_LOG_FLUSH_MS"),
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
