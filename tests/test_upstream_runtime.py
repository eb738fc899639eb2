"""The running server apart from the project's tooling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_server_does_not_load_the_fake_api_unless_offline() -> None:
    """With an API key the fake Anthropic API (the offline model) is not even imported."""
    code = "import server.app, sys; print('server.fake_anthropic' in sys.modules)"
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
