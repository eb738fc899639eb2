"""Settings read once from the environment (and `.env`), validated before the app starts.

Every variable is documented in `.env.example`. A bad value raises `ConfigError` naming the
variable, so a typo stops the deploy instead of surfacing as a strange runtime error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, TypeVar

T = TypeVar("T")

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ConfigError(ValueError):
    """A configuration variable has an invalid value."""


# Prices in USD per million tokens: input, output, cache write (5-minute TTL), cache read.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "claude-opus-4-5": {"input": 5.0, "output": 25.0, "cache_write": 6.25, "cache_read": 0.50},
    "claude-sonnet-4-5": {"input": 3.0, "output": 15.0, "cache_write": 3.75, "cache_read": 0.30},
    "claude-haiku-4-5": {"input": 1.0, "output": 5.0, "cache_write": 1.25, "cache_read": 0.10},
}


@dataclass(frozen=True)
class Settings:
    anthropic_api_key: str | None = field(default=None, repr=False)
    anthropic_base_url: str | None = None
    anthropic_max_retries: int = 2
    upstream_timeout_seconds: float = 120.0
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    web_concurrency: int = 1
    default_model: str = "claude-sonnet-4-5"
    allowed_models: tuple[str, ...] = ()
    model_prices: dict[str, dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    system_prompt: str = "You are a helpful assistant."
    allow_client_system_prompt: bool = True
    max_output_tokens: int = 4096
    session_ttl_seconds: int = 7 * 24 * 3600
    max_body_bytes: int = 8 * 1024 * 1024
    max_message_chars: int = 100_000
    max_session_messages: int = 1000
    max_ws_frame_bytes: int = 8 * 1024 * 1024
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    # tools and the turn engine
    enabled_tools: tuple[str, ...] = ("calculator", "current_time")
    max_tool_iterations: int = 5
    tool_timeout_seconds: float = 10.0
    prompt_caching: bool = True
    context_token_budget: int = 150_000
    session_token_budget: int = 0
    max_image_bytes: int = 5 * 1024 * 1024
    max_images: int = 20
    # turn lifecycle
    turn_lock_ttl_seconds: float = 10.0
    event_log_ttl_seconds: int = 600
    event_log_maxlen: int = 20_000
    event_log_flush_ms: int = 50
    stream_coalesce_ms: int = 80
    heartbeat_seconds: float = 15.0
    ws_ping_seconds: float = 20.0
    ws_compression: bool = False
    graceful_shutdown_seconds: float = 25.0
    idempotency_ttl_seconds: int = 600
    # offline model pacing (ms between streamed events) when no API key is set
    offline_pace_ms: float = 15.0
    log_level: str = "INFO"
    # security and limits (server/security.py); 0 turns a limit off
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    auth_disabled: bool = False
    ticket_secret: str | None = field(default=None, repr=False)
    ws_ticket_ttl_seconds: int = 60
    allowed_origins: tuple[str, ...] = ()
    rate_limit_rpm: int = 0
    rate_limit_tpm: int = 0
    max_concurrent_streams_per_principal: int = 0
    max_concurrent_upstream: int = 32
    upstream_queue_timeout_seconds: float = 10.0

    @property
    def offline(self) -> bool:
        """No API key and no explicit upstream: the bundled fake model answers."""
        return not self.anthropic_api_key and not self.anthropic_base_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        r = _Reader(env)
        default_model = r.get("DEFAULT_MODEL", str, cls.default_model, nonempty=True)
        prices = dict(DEFAULT_PRICES)
        prices.update(r.get("MODEL_PRICES", _parse_prices, {}))
        allowed = r.get("ALLOWED_MODELS", _parse_list, ())
        if not allowed:
            allowed = tuple(dict.fromkeys([default_model, *prices]))
        if default_model not in allowed:
            raise ConfigError(f"DEFAULT_MODEL: {default_model!r} is not in ALLOWED_MODELS")
        settings = cls(
            anthropic_api_key=r.get("ANTHROPIC_API_KEY", str, None) or None,
            anthropic_base_url=r.get("ANTHROPIC_BASE_URL", _parse_url, None),
            anthropic_max_retries=r.get("ANTHROPIC_MAX_RETRIES", _int_range(0, 10), 2),
            upstream_timeout_seconds=r.get("UPSTREAM_TIMEOUT_SECONDS", _float_range(1, 3600), 120.0),
            redis_url=r.get("REDIS_URL", _parse_redis_url, None),
            host=r.get("HOST", str, "127.0.0.1", nonempty=True),
            port=r.get("PORT", _int_range(0, 65535), 8000),
            web_concurrency=r.get("WEB_CONCURRENCY", _int_range(1, 256), 1),
            default_model=default_model,
            allowed_models=tuple(allowed),
            model_prices=prices,
            system_prompt=r.get("SYSTEM_PROMPT", str, cls.system_prompt),
            allow_client_system_prompt=r.get("ALLOW_CLIENT_SYSTEM_PROMPT", _parse_bool, True),
            max_output_tokens=r.get("MAX_OUTPUT_TOKENS", _int_range(1, 128_000), 4096),
            session_ttl_seconds=r.get("SESSION_TTL_SECONDS", _int_range(60, 10 * 365 * 86400), 7 * 86400),
            max_body_bytes=r.get("MAX_BODY_BYTES", _int_range(1024, 64 * 1024 * 1024), 8 * 1024 * 1024),
            max_message_chars=r.get("MAX_MESSAGE_CHARS", _int_range(1, 10_000_000), 100_000),
            max_session_messages=r.get("MAX_SESSION_MESSAGES", _int_range(2, 1_000_000), 1000),
            max_ws_frame_bytes=r.get("MAX_WS_FRAME_BYTES", _int_range(1024, 64 * 1024 * 1024), 8 * 1024 * 1024),
            header_timeout_seconds=r.get("HEADER_TIMEOUT_SECONDS", _float_range(0.1, 3600), 10.0),
            body_timeout_seconds=r.get("BODY_TIMEOUT_SECONDS", _float_range(0.1, 3600), 30.0),
            enabled_tools=r.get("ENABLED_TOOLS", _parse_list, ("calculator", "current_time")),
            max_tool_iterations=r.get("MAX_TOOL_ITERATIONS", _int_range(1, 100), 5),
            tool_timeout_seconds=r.get("TOOL_TIMEOUT_SECONDS", _float_range(0.01, 600), 10.0),
            prompt_caching=r.get("PROMPT_CACHING", _parse_bool, True),
            context_token_budget=r.get("CONTEXT_TOKEN_BUDGET", _int_range(1000, 10_000_000), 150_000),
            session_token_budget=r.get("SESSION_TOKEN_BUDGET", _int_range(0, 10**12), 0),
            max_image_bytes=r.get("MAX_IMAGE_BYTES", _int_range(1024, 64 * 1024 * 1024), 5 * 1024 * 1024),
            max_images=r.get("MAX_IMAGES", _int_range(0, 100), 20),
            turn_lock_ttl_seconds=r.get("TURN_LOCK_TTL_SECONDS", _float_range(1, 3600), 10.0),
            event_log_ttl_seconds=r.get("EVENT_LOG_TTL_SECONDS", _int_range(10, 7 * 86400), 600),
            event_log_maxlen=r.get("EVENT_LOG_MAXLEN", _int_range(100, 10_000_000), 20_000),
            event_log_flush_ms=r.get("EVENT_LOG_FLUSH_MS", _int_range(0, 50), 50),
            stream_coalesce_ms=r.get("STREAM_COALESCE_MS", _int_range(0, 200), 80),
            heartbeat_seconds=r.get("HEARTBEAT_SECONDS", _float_range(0.05, 3600), 15.0),
            ws_ping_seconds=r.get("WS_PING_SECONDS", _float_range(0.05, 3600), 20.0),
            ws_compression=r.get("WS_COMPRESSION", _parse_bool, False),
            graceful_shutdown_seconds=r.get("GRACEFUL_SHUTDOWN_SECONDS", _float_range(0, 3600), 25.0),
            idempotency_ttl_seconds=r.get("IDEMPOTENCY_TTL_SECONDS", _int_range(1, 7 * 86400), 600),
            offline_pace_ms=r.get("OFFLINE_PACE_MS", _float_range(0, 10_000), 15.0),
            log_level=r.get("LOG_LEVEL", _parse_log_level, "INFO"),
            **_security_settings(r),
        )
        if settings.web_concurrency > 1 and not settings.redis_url:
            raise ConfigError(
                "WEB_CONCURRENCY: more than one worker needs REDIS_URL; with in-memory sessions "
                "each worker would keep its own history and conversations would split"
            )
        _check_tools(settings.enabled_tools)
        return settings


class _Reader:
    """Reads one variable, converting it and naming it in any error."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def get(self, name: str, parse: Callable[[str], T], default: T, nonempty: bool = False) -> T:
        raw = self.env.get(name)
        if raw is None or (raw.strip() == "" and not nonempty):
            return default
        raw = raw.strip()
        if nonempty and not raw:
            raise ConfigError(f"{name}: must not be empty")
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{name}: {exc}") from None


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected a whole number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value

    return parse


def _float_range(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value

    return parse


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return raw.rstrip("/")


def _parse_redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return raw


def _parse_log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return level


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


def _security_settings(r: _Reader) -> dict:
    """Auth, CORS and limits. Secure by default: without keys only a loopback HOST is allowed
    (unless AUTH_DISABLED=true); once exposed, the limits default on (off for loopback dev)."""
    from .auth import parse_key_entry

    keys = r.get("AGENT_API_KEYS", _parse_list, ())
    for i, key in enumerate(keys):
        try:
            parse_key_entry(key)
        except ValueError as exc:  # never echo the key itself
            raise ConfigError(f"AGENT_API_KEYS: entry {i + 1}: {exc}") from None
    disabled = r.get("AUTH_DISABLED", _parse_bool, False)
    host = r.get("HOST", str, "127.0.0.1", nonempty=True)
    if disabled and keys:
        raise ConfigError("AUTH_DISABLED: cannot be true while AGENT_API_KEYS is set")
    if not keys and not disabled and not _is_loopback(host):
        raise ConfigError(f"AGENT_API_KEYS: required when HOST={host} is not a loopback address "
                          "(or set AUTH_DISABLED=true to serve anyone who can reach it)")
    exposed = bool(keys) or disabled
    return dict(
        api_keys=tuple(keys),
        auth_disabled=disabled,
        ticket_secret=r.get("AGENT_TICKET_SECRET", _parse_secret, None),
        ws_ticket_ttl_seconds=r.get("WS_TICKET_TTL_SECONDS", _int_range(5, 600), 60),
        allowed_origins=r.get("ALLOWED_ORIGINS", _parse_origins, ()),
        rate_limit_rpm=r.get("RATE_LIMIT_RPM", _int_range(0, 10_000_000), 60 if exposed else 0),
        rate_limit_tpm=r.get("RATE_LIMIT_TPM", _int_range(0, 10**12), 200_000 if exposed else 0),
        max_concurrent_streams_per_principal=r.get(
            "MAX_CONCURRENT_STREAMS_PER_PRINCIPAL", _int_range(0, 100_000), 8 if exposed else 0),
        max_concurrent_upstream=r.get("MAX_CONCURRENT_UPSTREAM", _int_range(1, 100_000), 32),
        upstream_queue_timeout_seconds=r.get("UPSTREAM_QUEUE_TIMEOUT_SECONDS", _float_range(0, 600), 10.0),
    )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_secret(raw: str) -> str:
    if len(raw) < 32:
        raise ValueError("must be at least 32 characters (e.g. `openssl rand -hex 32`)")
    return raw


def _parse_origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.rstrip("/") for o in _parse_list(raw))
    for origin in origins:
        if origin == "*":
            continue  # allowed: CORS here never sends credentials (keys travel in headers)
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest or "*" in rest:
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com[:port]")
    return origins


def _check_tools(enabled: tuple[str, ...]) -> None:
    from .tools import load_toolset

    try:
        load_toolset(enabled)
    except ValueError as exc:
        raise ConfigError(f"ENABLED_TOOLS: {exc}") from None
