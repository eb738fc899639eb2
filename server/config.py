"""Settings read once from the environment (and `.env`), validated before the app starts.

Each setting is declared once, in `Settings`. A bad value raises `ConfigError` naming the
variable, so a typo stops the deploy instead of surfacing as a strange runtime error.
`env_defaults()` lists every variable with its default, for the docs (README.md, `.env.example`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import Field, dataclass, field, fields
from functools import partial
from typing import Any, Callable, Mapping

from .tools import load_toolset, server_tools


class ConfigError(ValueError):
    """A configuration variable has an invalid value."""


# Prices in USD per million tokens: input, output, cache write (5-minute TTL), cache read.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "claude-opus-4-5": {"input": 5.0, "output": 25.0, "cache_write": 6.25, "cache_read": 0.50},
    "claude-sonnet-4-5": {"input": 3.0, "output": 15.0, "cache_write": 3.75, "cache_read": 0.30},
    "claude-haiku-4-5": {"input": 1.0, "output": 5.0, "cache_write": 1.25, "cache_read": 0.10},
}


def _number(kind: type, expected: str, lo: float, hi: float) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"expected {expected}, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value

    return parse


_int = partial(_number, int, "a whole number")
_float = partial(_number, float, "a number")


def _checked(ok: Callable[[str], bool], error: str, convert: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """A parser: `convert(raw)` when `ok(raw)`, else ValueError(`error`, where {raw!r} is the value)."""
    def parse(raw: str) -> Any:
        if not ok(raw):
            raise ValueError(error.format(raw=raw))
        return convert(raw)

    return parse


_BOOLS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}
_parse_bool = _checked(lambda raw: raw.lower() in _BOOLS, "expected true or false, got {raw!r}",
                       lambda raw: _BOOLS[raw.lower()])
_parse_url = _checked(lambda raw: raw.startswith(("http://", "https://")), "expected an http:// or https:// URL",
                      lambda raw: raw.rstrip("/"))
_parse_redis_url = _checked(lambda raw: raw.startswith(("redis://", "rediss://", "unix://")),
                            "expected a redis://, rediss:// or unix:// URL")
_parse_log_level = _checked(lambda raw: raw.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
                            "expected DEBUG, INFO, WARNING or ERROR", str.upper)
_parse_secret = _checked(lambda raw: len(raw) >= 32, "must be at least 32 characters (e.g. `openssl rand -hex 32`)")


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


THINKING_DISPLAYS = ("summarized", "omitted")
EFFORTS = ("low", "medium", "high", "xhigh", "max")


def _choice(*options: str) -> Callable[[str], str]:
    return _checked(lambda raw: raw.lower() in options, f"expected {' or '.join(options)}, got {{raw!r}}", str.lower)


def _parse_server_tools(raw: str) -> tuple[str, ...]:
    return server_tools.resolve(_parse_list(raw))


def _parse_domains(raw: str) -> tuple[str, ...]:
    domains = _parse_list(raw)
    for domain in domains:
        if "://" in domain or any(c.isspace() for c in domain):
            raise ValueError(f"{domain!r} is not a domain like example.com (no scheme, no spaces)")
    return domains


_LOCATION_KEYS = ("city", "region", "country", "timezone")


def _parse_user_location(raw: str) -> dict[str, str]:
    """The web search's approximate user location: {"city", "region", "country", "timezone"}."""
    try:
        location = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError('expected JSON like {"city": "Paris", "country": "FR", "timezone": "Europe/Paris"}') from None
    if not isinstance(location, dict) or not location:
        raise ValueError(f"expected a JSON object with some of {', '.join(_LOCATION_KEYS)}")
    unknown = sorted(set(location) - set(_LOCATION_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_LOCATION_KEYS)}")
    if not all(isinstance(value, str) and value.strip() for value in location.values()):
        raise ValueError("every value must be a non-empty string")
    country, zone = location.get("country"), location.get("timezone")
    if country is not None and not re.fullmatch("[A-Za-z]{2}", country):
        raise ValueError(f"country: expected a two-letter ISO 3166 code such as 'US', got {country!r}")
    if zone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # (only when set: cold start)

        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: {zone!r} is not an IANA timezone such as 'Europe/Paris'") from None
    return {key: location[key] for key in _LOCATION_KEYS if key in location}


def _parse_prices(raw: str) -> dict[str, dict[str, float]]:
    try:
        table = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError("expected JSON like {\"model\": {\"input\": 3, \"output\": 15, ...}}") from None
    if not isinstance(table, dict):
        raise ValueError("expected a JSON object keyed by model name")
    keys = {"input", "output", "cache_write", "cache_read"}
    for model, prices in table.items():
        if not isinstance(prices, dict) or set(prices) != keys:
            raise ValueError(f"{model}: give exactly {sorted(keys)} in USD per million tokens")
        if not all(isinstance(v, (int, float)) and v >= 0 for v in prices.values()):
            raise ValueError(f"{model}: prices must be non-negative numbers")
    return {m: {k: float(v) for k, v in p.items()} for m, p in table.items()}


def _parse_keys(raw: str) -> tuple[str, ...]:
    from .security.keys import parse_key_entry

    keys = _parse_list(raw)
    for i, key in enumerate(keys):
        try:
            parse_key_entry(key)
        except ValueError as exc:  # never echo the key itself
            raise ValueError(f"entry {i + 1}: {exc}") from None
    return keys


def _parse_origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.rstrip("/") for o in _parse_list(raw))
    for origin in origins:
        if origin == "*":
            continue  # allowed: CORS here never sends credentials (keys travel in headers)
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest or "*" in rest:
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com[:port]")
    return origins


def _env(default: Any, parse: Callable[[str], Any], *, env: str | None = None, nonempty: bool = False,
         exposed: Any = None, secret: bool = False) -> Any:
    """A setting: its default and parser; `env` when the variable is not the field's name in
    capitals; `exposed`: the default once the server is exposed (API keys or AUTH_DISABLED)."""
    meta = {"parse": parse, "env": env, "nonempty": nonempty, "exposed": exposed}
    return field(default=default, metadata=meta, repr=not secret)


@dataclass(frozen=True)
class Settings:
    anthropic_api_key: str | None = _env(None, str, secret=True)
    anthropic_base_url: str | None = _env(None, _parse_url)
    anthropic_max_retries: int = _env(2, _int(0, 10))
    upstream_timeout_seconds: float = _env(120.0, _float(1, 3600))
    redis_url: str | None = _env(None, _parse_redis_url)
    redis_cluster: bool = _env(False, _parse_bool)
    redis_tls_ca_file: str | None = _env(None, str)
    redis_tls_cert_file: str | None = _env(None, str)
    redis_tls_key_file: str | None = _env(None, str)
    redis_wait_replicas: int = _env(0, _int(0, 16))
    host: str = _env("127.0.0.1", str, nonempty=True)
    port: int = _env(8000, _int(0, 65535))
    web_concurrency: int = _env(1, _int(1, 256))
    default_model: str = _env("claude-sonnet-4-5", str, nonempty=True)
    title_model: str | None = _env(None, str)  # a session's title from a short call after its first answer
    allowed_models: tuple[str, ...] = _env((), _parse_list)  # (): DEFAULT_MODEL and the priced models
    # the environment's table is merged over DEFAULT_PRICES
    model_prices: dict[str, dict[str, float]] = _env(None, _parse_prices)
    system_prompt: str = _env("You are a helpful assistant.", str)
    allow_client_system_prompt: bool = _env(True, _parse_bool)
    max_output_tokens: int = _env(4096, _int(1, 128_000))
    session_ttl_seconds: int = _env(7 * 24 * 3600, _int(60, 10 * 365 * 86400))
    max_body_bytes: int = _env(8 * 1024 * 1024, _int(1024, 64 * 1024 * 1024))
    max_message_chars: int = _env(100_000, _int(1, 10_000_000))
    max_session_messages: int = _env(1000, _int(2, 1_000_000))
    max_ws_frame_bytes: int = _env(8 * 1024 * 1024, _int(1024, 64 * 1024 * 1024))
    header_timeout_seconds: float = _env(10.0, _float(0.1, 3600))
    body_timeout_seconds: float = _env(30.0, _float(0.1, 3600))
    # tools and the turn engine
    # None: every tool of the built-in modules and of TOOL_MODULES; else only these names
    enabled_tools: tuple[str, ...] | None = _env(None, _parse_list)
    tool_modules: tuple[str, ...] = _env((), _parse_list)  # importable modules defining @tool functions
    mcp_servers: str | None = _env(None, str)  # {"mcpServers": {...}}: a JSON file path, or the JSON itself
    mcp_connect_timeout_seconds: float = _env(10.0, _float(0.1, 600))
    tools_requiring_approval: tuple[str, ...] = _env((), _parse_list)  # names; MCP tools by namespaced name
    tool_approval_timeout_seconds: float = _env(600.0, _float(1, 86400))  # also: waiting for a client tool
    max_tool_iterations: int = _env(5, _int(1, 100))
    tool_timeout_seconds: float = _env(10.0, _float(0.01, 600))
    prompt_caching: bool = _env(True, _parse_bool)
    context_token_budget: int = _env(150_000, _int(1000, 10_000_000))
    # past the budget: older turns summarised by a model call (server/compaction.py), or dropped
    context_strategy: str = _env("summarize", _choice("summarize", "trim"))
    summary_model: str | None = _env(None, str)  # None: the turn's model
    summary_max_tokens: int = _env(2048, _int(256, 32_000))
    session_token_budget: int = _env(0, _int(0, 10**12))
    max_image_bytes: int = _env(5 * 1024 * 1024, _int(1024, 64 * 1024 * 1024))
    max_images: int = _env(20, _int(0, 100))
    max_document_bytes: int = _env(8 * 1024 * 1024, _int(1024, 64 * 1024 * 1024))
    max_document_pages: int = _env(100, _int(1, 10_000))
    max_documents: int = _env(5, _int(0, 100))
    # extended thinking and effort (deployment defaults; a request's `thinking`/`effort` win)
    thinking_budget_tokens: int = _env(0, _int(0, 128_000))  # 0: off; else 1024..MAX_OUTPUT_TOKENS-1
    thinking_adaptive: bool = _env(False, _parse_bool)
    thinking_display: str = _env("", _choice(*THINKING_DISPLAYS))
    thinking_effort: str = _env("", _choice(*EFFORTS))
    thinking_interleaved: bool = _env(False, _parse_bool)
    allow_client_thinking: bool = _env(True, _parse_bool)
    # server tools (run by Anthropic; server/tools/server_tools.py), as versioned types
    server_tools: tuple[str, ...] = _env((), _parse_server_tools)
    web_search_max_uses: int = _env(0, _int(0, 10_000))
    web_search_allowed_domains: tuple[str, ...] = _env((), _parse_domains)
    web_search_blocked_domains: tuple[str, ...] = _env((), _parse_domains)
    web_search_user_location: dict[str, str] | None = _env(None, _parse_user_location)
    web_fetch_max_uses: int = _env(0, _int(0, 10_000))
    web_fetch_allowed_domains: tuple[str, ...] = _env((), _parse_domains)
    web_fetch_blocked_domains: tuple[str, ...] = _env((), _parse_domains)
    web_fetch_max_content_tokens: int = _env(0, _int(0, 10_000_000))
    web_fetch_citations: bool = _env(False, _parse_bool)
    web_search_price_per_1k: float = _env(10.0, _float(0, 1_000_000))
    # turn lifecycle
    turn_lock_ttl_seconds: float = _env(10.0, _float(1, 3600))
    event_log_ttl_seconds: int = _env(600, _int(10, 7 * 86400))
    event_log_maxlen: int = _env(20_000, _int(100, 10_000_000))
    event_log_flush_ms: int = _env(50, _int(0, 50))
    stream_coalesce_ms: int = _env(80, _int(0, 200))
    heartbeat_seconds: float = _env(15.0, _float(0.05, 3600))
    ws_ping_seconds: float = _env(20.0, _float(0.05, 3600))
    ws_compression: bool = _env(False, _parse_bool)
    graceful_shutdown_seconds: float = _env(25.0, _float(0, 3600))
    idempotency_ttl_seconds: int = _env(600, _int(1, 7 * 86400))
    # offline model pacing (ms between streamed events) when no API key is set
    offline_pace_ms: float = _env(15.0, _float(0, 10_000))
    log_level: str = _env("INFO", _parse_log_level)
    # security and limits (server/security/); 0 turns a limit off. Secure by default: without
    # keys only a loopback HOST is allowed (unless AUTH_DISABLED=true); once exposed, the
    # limits default on (off for loopback development).
    api_keys: tuple[str, ...] = _env((), _parse_keys, env="AGENT_API_KEYS", secret=True)
    auth_disabled: bool = _env(False, _parse_bool)
    ticket_secret: str | None = _env(None, _parse_secret, env="AGENT_TICKET_SECRET", secret=True)
    ws_ticket_ttl_seconds: int = _env(60, _int(5, 600))
    allowed_origins: tuple[str, ...] = _env((), _parse_origins)
    rate_limit_rpm: int = _env(0, _int(0, 10_000_000), exposed=60)
    rate_limit_tpm: int = _env(0, _int(0, 10**12), exposed=200_000)
    max_concurrent_streams_per_principal: int = _env(0, _int(0, 100_000), exposed=8)
    max_concurrent_upstream: int = _env(32, _int(1, 100_000))
    upstream_queue_timeout_seconds: float = _env(10.0, _float(0, 600))

    @property
    def offline(self) -> bool:
        """No API key and no explicit upstream: the bundled fake model answers."""
        return not self.anthropic_api_key and not self.anthropic_base_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        values = {f.name: _read(env, f) for f in fields(cls)}
        values["model_prices"] = prices = {**DEFAULT_PRICES, **(values["model_prices"] or {})}
        default_model = values["default_model"]
        if not values["allowed_models"]:
            values["allowed_models"] = tuple(dict.fromkeys([default_model, *prices]))
        if default_model not in values["allowed_models"]:
            raise ConfigError(f"DEFAULT_MODEL: {default_model!r} is not in ALLOWED_MODELS")
        keys, disabled, host = values["api_keys"], values["auth_disabled"], values["host"]
        if disabled and keys:
            raise ConfigError("AUTH_DISABLED: cannot be true while AGENT_API_KEYS is set")
        if not keys and not disabled and not is_loopback(host):
            raise ConfigError(f"AGENT_API_KEYS: required when HOST={host} is not a loopback address "
                              "(or set AUTH_DISABLED=true to serve anyone who can reach it)")
        if keys or disabled:
            for f in fields(cls):
                if f.metadata.get("exposed") is not None and not env.get(_name(f), "").strip():
                    values[f.name] = f.metadata["exposed"]
        settings = cls(**values)
        if settings.web_concurrency > 1 and not settings.redis_url:
            raise ConfigError("WEB_CONCURRENCY: more than one worker needs REDIS_URL; with in-memory sessions "
                              "each worker would keep its own history and conversations would split")
        _check_redis(settings)
        try:
            tools = load_toolset(settings.enabled_tools, settings.tool_modules)
        except ValueError as exc:  # (the message names the variable, module and tool)
            raise ConfigError(str(exc)) from None
        mcp_prefixes: tuple[str, ...] = ()
        if settings.mcp_servers:
            from .tools.mcp_config import parse_mcp_servers, tool_prefix  # (no `mcp` import: the worker's)

            try:
                mcp_prefixes = tuple(f"{tool_prefix(name)}__" for name in parse_mcp_servers(settings.mcp_servers))
            except ValueError as exc:
                raise ConfigError(f"MCP_SERVERS: {exc}") from None
        # A misspelt name would let its tool run unapproved: each must name a tool this server runs
        # (an MCP tool by its server's prefix: its list is known once the worker connects).
        unknown = [n for n in settings.tools_requiring_approval if n not in tools and not n.startswith(mcp_prefixes)]
        if unknown:
            raise ConfigError(f"TOOLS_REQUIRING_APPROVAL: {', '.join(map(repr, unknown))} is not a tool of this "
                              f"server (tools: {', '.join(tools) or 'none'}"
                              + (f"; MCP tools: {', '.join(p + '<tool>' for p in mcp_prefixes)})" if mcp_prefixes
                                 else ")"))
        clash = sorted(set(tools) & {server_tools.tool_name(t) for t in settings.server_tools})
        if clash:
            raise ConfigError(f"SERVER_TOOLS: {', '.join(clash)} is also the name of a tool of this server (tool names must differ)")
        _check_thinking(settings)
        for tool in ("WEB_SEARCH", "WEB_FETCH"):
            allowed, blocked = (getattr(settings, f"{tool.lower()}_{kind}_domains") for kind in ("allowed", "blocked"))
            if allowed and blocked:
                raise ConfigError(f"{tool}_BLOCKED_DOMAINS: cannot be set together with {tool}_ALLOWED_DOMAINS")
        return settings


def _check_redis(settings: Settings) -> None:
    """Redis options that cannot work are startup errors, not a first turn's 500."""
    url = settings.redis_url or ""
    tls_files = {name: path for name, path in (("REDIS_TLS_CA_FILE", settings.redis_tls_ca_file),
                                               ("REDIS_TLS_CERT_FILE", settings.redis_tls_cert_file),
                                               ("REDIS_TLS_KEY_FILE", settings.redis_tls_key_file)) if path}
    needs_url = [*(["REDIS_CLUSTER"] if settings.redis_cluster else []),
                 *(["REDIS_WAIT_REPLICAS"] if settings.redis_wait_replicas else []), *tls_files]
    if needs_url and not url:
        raise ConfigError(f"{needs_url[0]}: needs REDIS_URL")
    if settings.redis_cluster and url.startswith("unix://"):
        raise ConfigError("REDIS_CLUSTER: needs a redis:// or rediss:// URL naming one of the cluster's nodes")
    if tls_files and not url.startswith("rediss://"):
        raise ConfigError(f"{next(iter(tls_files))}: needs a rediss:// REDIS_URL (TLS)")
    if bool(settings.redis_tls_cert_file) != bool(settings.redis_tls_key_file):
        raise ConfigError("REDIS_TLS_CERT_FILE: a client certificate needs REDIS_TLS_KEY_FILE, and the key the certificate")
    for name, path in tls_files.items():
        if not os.access(path, os.R_OK) or os.path.isdir(path):
            raise ConfigError(f"{name}: cannot read {path!r}")
    if tls_files:  # load them as the first connection will: a wrong file fails here, named
        import ssl

        try:
            context = ssl.create_default_context(cafile=settings.redis_tls_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"REDIS_TLS_CA_FILE: not a CA certificate file ({exc})") from None
        if settings.redis_tls_cert_file:
            try:
                context.load_cert_chain(settings.redis_tls_cert_file, settings.redis_tls_key_file)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"REDIS_TLS_CERT_FILE: not a certificate matching REDIS_TLS_KEY_FILE ({exc})") from None


def redis_tls_options(settings: Settings) -> dict[str, str]:
    """redis-py's ssl_* arguments for the TLS files (a rediss:// URL verifies the server's
    certificate against the system's CAs unless REDIS_TLS_CA_FILE names others)."""
    options = {"ssl_ca_certs": settings.redis_tls_ca_file, "ssl_certfile": settings.redis_tls_cert_file,
               "ssl_keyfile": settings.redis_tls_key_file}
    return {k: v for k, v in options.items() if v}


def _check_thinking(settings: Settings) -> None:
    """The deployment's thinking config must be one the API accepts, or no turn would run."""
    budget = settings.thinking_budget_tokens
    if budget and budget < 1024:
        raise ConfigError(f"THINKING_BUDGET_TOKENS: {budget} is below the API's minimum of 1024 (0 turns it off)")
    if budget and budget >= settings.max_output_tokens:
        raise ConfigError(f"THINKING_BUDGET_TOKENS: must be less than MAX_OUTPUT_TOKENS "
                          f"({settings.max_output_tokens}): the thinking budget is part of max_tokens")
    if budget and settings.thinking_adaptive:
        raise ConfigError("THINKING_ADAPTIVE: cannot be true while THINKING_BUDGET_TOKENS is set (choose one)")
    if settings.thinking_display and not (budget or settings.thinking_adaptive):
        raise ConfigError("THINKING_DISPLAY: needs THINKING_BUDGET_TOKENS or THINKING_ADAPTIVE "
                          "(it is part of their thinking config)")


def _name(f: Field) -> str:
    return f.metadata.get("env") or f.name.upper()


def _read(env: Mapping[str, str], f: Field) -> Any:
    """One variable, parsed (its default when unset or blank), named in any error."""
    name, raw = _name(f), env.get(_name(f))
    if raw is None or not raw.strip():
        if raw is not None and f.metadata.get("nonempty"):
            raise ConfigError(f"{name}: must not be empty")
        return f.default
    try:
        return f.metadata["parse"](raw.strip())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


def env_defaults() -> list[tuple[str, str]]:
    """(variable, default as the docs write it) for every setting, in declaration order; ""
    when there is none: unset, or derived from other settings."""
    out = []
    for f in fields(Settings):
        value = None if f.metadata.get("exposed") is not None else f.default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = ",".join(value) if isinstance(value, tuple) else "" if value is None else str(value)
        out.append((_name(f), text.lower() if isinstance(value, bool) else text))
    return out


def is_loopback(host: str) -> bool:
    """A loopback name or address: HOST here, a client address or a Host header's name in the
    security guard (server/security/guard.py). The one loopback check."""
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
