"""Rate limits and stream slots, per principal (per client IP without a key; README "Security").

Requests and tokens per minute use GCRA (the generic cell rate algorithm: a leaky bucket
kept as one number, the "theoretical arrival time"): a limit of N per minute admits a burst
of N, then one every 60/N seconds; a refused request costs nothing. Tokens are only known
after a turn, so they are charged afterwards to the session owner (the bucket may go into
debt) and a turn is admitted while the bucket has room for one token.

With REDIS_URL every worker shares the counters (atomic Lua, Redis' own clock):

    agent:rl:{<id>}:rpm       string  GCRA arrival time (ms), expires when the bucket is full again
    agent:rl:{<id>}:tpm       string  same, for tokens
    agent:rl:{<id>}:streams   zset    open stream slots, score = expiry (ms); renewed while open,
                                      so a crashed worker's slots free themselves
    agent:ticket:{<nonce>}    string  a WebSocket ticket already used (single use)

Without Redis the same algorithms run in this process's memory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any, AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.types import Scope

from .. import metrics
from ..config import Settings
from ..errors import ApiError
from .keys import ANONYMOUS, SCOPE_KEY

log = logging.getLogger("server.security")

PERIOD_MS = 60_000
SLOT_TTL_MS = 30_000  # a stream slot not renewed for this long is free again

_NOW = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS: bucket   ARGV: interval_ms cost mode   -> retry_after_ms (0 = allowed)
# mode: charge (count it if allowed) | peek (only ask) | force (count it, even into debt)
_GCRA = _NOW + """
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval * tonumber(ARGV[2])
if ARGV[3] ~= 'force' and new_tat - now > %(period)d then
  return math.ceil(new_tat - now - %(period)d)
end
if ARGV[3] ~= 'peek' then
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
end
return 0
""" % {"period": PERIOD_MS}
# KEYS: zset   ARGV: slot ttl_ms max|'renew'   -> 1 taken (or renewed), 0 full
_SLOT = _NOW + """
if ARGV[3] == 'renew' then
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def bucket_key(identity: str, kind: str) -> str:
    return f"agent:rl:{{{identity}}}:{kind}"


class RedisLimiter:
    """The counters in Redis, on a client it is given (the store's, with its pool)."""

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis
        self._gcra = redis.register_script(_GCRA)
        self._slot = redis.register_script(_SLOT)

    async def gcra(self, key: str, per_minute: int, cost: int, mode: str) -> float:
        """Seconds to wait (0: allowed)."""
        return int(await self._gcra(keys=[key], args=[PERIOD_MS / per_minute, cost, mode])) / 1000

    async def take_slot(self, key: str, slot: str, limit: int) -> bool:
        return bool(await self._slot(keys=[key], args=[slot, SLOT_TTL_MS, limit]))

    async def renew_slot(self, key: str, slot: str) -> None:
        await self._slot(keys=[key], args=[slot, SLOT_TTL_MS, "renew"])

    async def release_slot(self, key: str, slot: str) -> None:
        await self.redis.zrem(key, slot)

    async def claim_once(self, name: str, ttl_seconds: int) -> bool:
        """True the first time `name` is claimed within ttl."""
        return bool(await self.redis.set(f"agent:ticket:{{{name}}}", b"1", nx=True, ex=max(1, ttl_seconds)))


class MemoryLimiter:
    """One process (REDIS_URL unset, one worker): the same algorithms in dicts. Its stream
    slots need no expiry: they die with the process that holds them."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}  # GCRA arrival times and ticket claims' expiries (ms)
        self._slots: dict[str, set[str]] = {}
        self._sweep_at = 0.0

    def _now(self) -> float:
        now = time.monotonic() * 1000
        if now >= self._sweep_at:  # forget full buckets and expired claims once a period
            self._sweep_at = now + PERIOD_MS
            self._until = {k: v for k, v in self._until.items() if v > now}
        return now

    async def gcra(self, key: str, per_minute: int, cost: int, mode: str) -> float:
        now = self._now()
        new_tat = max(self._until.get(key, 0.0), now) + PERIOD_MS / per_minute * cost
        if mode != "force" and new_tat - now > PERIOD_MS:
            return (new_tat - now - PERIOD_MS) / 1000
        if mode != "peek":
            self._until[key] = new_tat
        return 0.0

    async def take_slot(self, key: str, slot: str, limit: int) -> bool:
        slots = self._slots.setdefault(key, set())
        if len(slots) >= limit:
            return False
        slots.add(slot)
        return True

    async def renew_slot(self, key: str, slot: str) -> None:
        pass

    async def release_slot(self, key: str, slot: str) -> None:
        slots = self._slots.get(key, set())
        slots.discard(slot)
        if not slots:
            self._slots.pop(key, None)

    async def claim_once(self, name: str, ttl_seconds: int) -> bool:
        now = self._now()
        if self._until.get(name, 0.0) > now:  # (a nonce never looks like a bucket key)
            return False
        self._until[name] = now + ttl_seconds * 1000
        return True


class Limits:
    """The limits of one worker, on memory or (once attached) Redis counters."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.backend: MemoryLimiter | RedisLimiter = MemoryLimiter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warned_at = 0.0

    async def admit(self, scope: Scope, *, turn: bool) -> None:
        """Requests per minute for this caller; for a turn also the tokens-per-minute budget."""
        s = self.settings
        if turn and s.rate_limit_tpm:
            key = bucket_key(scope.get(SCOPE_KEY) or ANONYMOUS, "tpm")
            if wait := await self._safe(self.backend.gcra(key, s.rate_limit_tpm, 1, "peek"), 0):
                raise _rate_limited(wait, "tokens_per_minute",
                                    f"Token budget spent: the limit is {s.rate_limit_tpm} tokens per minute.")
        if s.rate_limit_rpm:
            key = bucket_key(_identity(scope), "rpm")
            if wait := await self._safe(self.backend.gcra(key, s.rate_limit_rpm, 1, "charge"), 0):
                raise _rate_limited(wait, "requests_per_minute",
                                    f"Too many requests: the limit is {s.rate_limit_rpm} per minute.")

    async def take_stream_slot(self, scope: Scope) -> AbstractAsyncContextManager[None]:
        """One of the caller's concurrent streams (SSE, WebSocket): held while in the returned context."""
        limit = self.settings.max_concurrent_streams_per_principal
        if not limit:
            return nullcontext()
        key, slot = bucket_key(_identity(scope), "streams"), secrets.token_hex(8)
        if not await self._safe(self.backend.take_slot(key, slot, limit), True):
            raise _rate_limited(5, "concurrent_streams", f"Too many open streams: at most {limit} at once per API key.")
        return self._holding(key, slot)

    @asynccontextmanager
    async def _holding(self, key: str, slot: str) -> AsyncIterator[None]:
        renewer = asyncio.create_task(self._renew(key, slot))
        try:
            yield
        finally:
            renewer.cancel()
            await self._safe(self.backend.release_slot(key, slot))

    async def _renew(self, key: str, slot: str) -> None:
        while True:
            await asyncio.sleep(SLOT_TTL_MS / 3000)
            await self._safe(self.backend.renew_slot(key, slot))

    def charge_tokens(self, principal: str, usage: Any) -> None:
        """Engine listener: a finished turn's tokens go on its owner's per-minute budget."""
        tokens = int(getattr(usage, "total", 0) or 0)
        if not self.settings.rate_limit_tpm or tokens <= 0:
            return
        charge = self.backend.gcra(bucket_key(principal, "tpm"), self.settings.rate_limit_tpm, tokens, "force")
        task = asyncio.get_running_loop().create_task(self._safe(charge))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        if self._tasks:  # at shutdown: let the last charges reach Redis
            await asyncio.wait(list(self._tasks), timeout=2)

    async def claim(self, nonce: str, ttl_seconds: int) -> bool:
        """A ticket is single use: while Redis cannot say whether it was used, it is refused
        (fails closed), unlike the counters."""
        try:
            return await self.backend.claim_once(nonce, ttl_seconds)
        except (RedisError, OSError, asyncio.TimeoutError):
            raise ApiError("store_unavailable") from None

    async def _safe(self, coro: Any, default: Any = None) -> Any:
        """Rate limits and stream slots fail open while Redis does not answer: every route they
        guard needs it too and answers `store_unavailable`, so nothing can spend tokens."""
        try:
            return await coro
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            now = time.monotonic()
            if now - self._warned_at > 10:
                self._warned_at = now
                log.warning("rate limiter cannot reach Redis (%s); counters paused until it answers",
                            type(exc).__name__)
            return default


def _identity(scope: Scope) -> str:
    """Who the per-request limits count: the key's principal, else the client address."""
    if (principal := scope.get(SCOPE_KEY) or ANONYMOUS) != ANONYMOUS:
        return principal
    return f"ip:{client[0]}" if (client := scope.get("client")) else "ip:unknown"


def _rate_limited(wait: float, limit: str, message: str) -> ApiError:
    metrics.rate_limited(limit)
    return ApiError("rate_limited", message, retry_after=max(1, math.ceil(wait)), limit=limit)
