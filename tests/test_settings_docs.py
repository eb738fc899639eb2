"""The docs agree with the code: every setting is in README.md's configuration table and in
`.env.example`, with the default `server.config.env_defaults()` gives.

README rows look like "| `ENV_NAME` | `default` | meaning |" (no default: `—`, no backticks);
`.env.example` has "ENV_NAME=default" or "# ENV_NAME=default" for every setting.
"""

from __future__ import annotations

import re
from pathlib import Path

from server.config import env_defaults

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_gives_every_default():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|\s*(`[^`]*`|—)\s*\|", readme, re.M))
    wrong = {}
    for name, default in env_defaults():
        want = f"`{default}`" if default else "—"
        if rows.get(name) != want:
            wrong[name] = (rows.get(name, "missing"), want)
    assert wrong == {}, "README.md configuration table: (found, expected) per variable"


def test_env_example_gives_every_default():
    lines = re.findall(r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", (ROOT / ".env.example").read_text(), re.M)
    found: dict[str, set[str]] = {}
    for name, value in lines:
        found.setdefault(name, set()).add(value.strip())
    wrong = {name: (sorted(found.get(name, {"missing"})), default) for name, default in env_defaults()
             if default not in found.get(name, set())}
    assert wrong == {}, ".env.example: (found, expected) per variable"
