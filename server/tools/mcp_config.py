"""`MCP_SERVERS`: the `{"mcpServers": {...}}` JSON that Claude Desktop, Claude Code and most MCP
clients share, read and checked at startup (without importing the `mcp` SDK: that costs a second
and only the workers need it). Every problem is a ValueError naming the server and the key, so a
typo stops the server with a line that says where, not at the first tool call."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

# Keys of one server entry: the common shape, plus ours (allowedTools, timeout, disabled).
# "type" says the transport explicitly (Claude Code writes it); "description" is a note for people.
_STDIO_KEYS = {"command", "args", "env", "cwd"}
_HTTP_KEYS = {"url", "headers"}
_OUR_KEYS = {"allowedTools", "timeout", "disabled", "type", "description"}
_TYPES = {"stdio": "stdio", "http": "http", "streamable-http": "http", "streamableHttp": "http",
          "streamable_http": "http"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MAX_TIMEOUT_SECONDS = 3600.0


@dataclass(frozen=True)
class ServerConfig:
    """One MCP server: a command to run (stdio) or a URL (streamable HTTP)."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # over the SDK's safe default environment
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    allowed_tools: frozenset[str] | None = None  # the server's own tool names; None: all
    timeout: float | None = None  # seconds per call; None: TOOL_TIMEOUT_SECONDS
    disabled: bool = False

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"


def parse_mcp_servers(raw: str, environ: dict[str, str] | None = None) -> dict[str, ServerConfig]:
    """`raw`: inline JSON (starts with `{`) or the path of a JSON file. `${VAR}` and
    `${VAR:-default}` in args, env, url and headers expand from `environ` (the process's)."""
    environ = dict(os.environ) if environ is None else environ
    text = raw.strip()
    where = "inline JSON"
    if not text.startswith("{"):
        where = text
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ValueError(f"cannot read {text!r} ({exc.strerror or exc}); give a JSON file path "
                             "or the JSON itself") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON in {where}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("mcpServers"), dict):
        raise ValueError('expected {"mcpServers": {"<name>": {...}}}')
    unknown = sorted(set(doc) - {"mcpServers"})
    if unknown:
        raise ValueError(f"unknown top-level key {unknown[0]!r} (expected only \"mcpServers\")")
    servers: dict[str, ServerConfig] = {}
    prefixes: dict[str, str] = {}
    for name, entry in doc["mcpServers"].items():
        config = _server(name, entry, environ)
        prefix = tool_prefix(name)
        if prefix in prefixes:
            raise ValueError(f"servers {prefixes[prefix]!r} and {name!r} give the same tool name prefix "
                             f"{prefix!r}; rename one")
        prefixes[prefix] = name
        servers[name] = config
    return servers


def tool_prefix(server: str) -> str:
    """The server part of its tools' names (`<prefix>__<tool>`): the API allows [a-zA-Z0-9_-]."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", server)


def _server(name: str, entry: Any, environ: dict[str, str]) -> ServerConfig:
    where = f"server {name!r}"
    if not name or len(name) > 40:
        raise ValueError(f"{where}: the name must have 1 to 40 characters (it prefixes the tool names)")
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with \"command\" or \"url\"")
    unknown = sorted(set(entry) - _STDIO_KEYS - _HTTP_KEYS - _OUR_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: "
                         f"{', '.join(sorted(_STDIO_KEYS | _HTTP_KEYS | _OUR_KEYS))})")
    kind = entry.get("type")
    if kind is not None and kind not in _TYPES:
        hint = " (SSE is not supported: use the server's streamable HTTP endpoint)" if kind == "sse" else ""
        raise ValueError(f"{where}: key \"type\" must be one of {', '.join(sorted(_TYPES))}{hint}")
    has_command, has_url = "command" in entry, "url" in entry
    if has_command == has_url:
        raise ValueError(f"{where}: give either \"command\" (stdio) or \"url\" (streamable HTTP)")
    transport = "stdio" if has_command else "http"
    if kind is not None and _TYPES[kind] != transport:
        raise ValueError(f"{where}: key \"type\" is {kind!r} but the server has "
                         f"{'a command' if has_command else 'a url'}")
    wrong = sorted(set(entry) & (_HTTP_KEYS if has_command else _STDIO_KEYS))
    if wrong:
        raise ValueError(f"{where}: key {wrong[0]!r} does not apply to a "
                         f"{'stdio' if has_command else 'streamable HTTP'} server")

    def text(key: str, value: Any, expand: bool = True) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: key {key!r} must be a non-empty string")
        return _expand(value, environ, f"{where}: key {key!r}") if expand else value

    def strings(key: str, value: Any) -> dict[str, str]:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"{where}: key {key!r} must be an object of strings")
        return {k: _expand(v, environ, f"{where}: key {key!r} ({k})") for k, v in value.items()}

    options: dict[str, Any] = {}
    if has_command:
        options["command"] = text("command", entry["command"])
        args = entry.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValueError(f"{where}: key 'args' must be a list of strings")
        options["args"] = tuple(_expand(a, environ, f"{where}: key 'args'") for a in args)
        options["env"] = strings("env", entry.get("env", {}))
        if "cwd" in entry:
            options["cwd"] = text("cwd", entry["cwd"])
    else:
        url = text("url", entry["url"])
        if not re.match(r"https?://[^/\s]+", url):
            raise ValueError(f"{where}: key 'url' must be an http:// or https:// URL")
        options["url"] = url
        options["headers"] = strings("headers", entry.get("headers", {}))
    if "allowedTools" in entry:
        allowed = entry["allowedTools"]
        if not isinstance(allowed, list) or not all(isinstance(t, str) and t for t in allowed):
            raise ValueError(f"{where}: key 'allowedTools' must be a list of tool names")
        options["allowed_tools"] = frozenset(allowed)
    if "timeout" in entry:
        timeout = entry["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout <= MAX_TIMEOUT_SECONDS:
            raise ValueError(f"{where}: key 'timeout' must be a number of seconds, above 0 and "
                             f"at most {MAX_TIMEOUT_SECONDS:g}")
        options["timeout"] = float(timeout)
    if "disabled" in entry:
        if not isinstance(entry["disabled"], bool):
            raise ValueError(f"{where}: key 'disabled' must be true or false")
        options["disabled"] = entry["disabled"]
    if "description" in entry and not isinstance(entry["description"], str):
        raise ValueError(f"{where}: key 'description' must be a string")
    return ServerConfig(name=name, **options)


def _expand(value: str, environ: dict[str, str], where: str) -> str:
    """`${VAR}` / `${VAR:-default}` from the environment; an unset variable without default is an error
    (an empty token sent to a server fails later and less clearly)."""

    def one(m: re.Match[str]) -> str:
        value = environ.get(m[1])
        if value or (value is not None and m[2] is None):
            return value
        if m[2] is not None:  # (as in the shell: unset or empty)
            return m[2]
        raise ValueError(f"{where}: environment variable {m[1]} is not set")

    return _VAR.sub(one, value)
