"""Rate limits and stream slots.

Requests and tokens per minute use GCRA (the generic cell rate algorithm: a leaky bucket
kept as one number, the "theoretical arrival time"): a limit of N per minute admits a burst
of N, then one every 60/N seconds; a refused request costs nothing. Tokens are only known
after a turn, so they are charged afterwards (the bucket may go into debt) and a new turn is
admitted while the bucket has room for at least one token.

With REDIS_URL every worker shares the counters (atomic Lua, Redis' own clock):

    agent:rl:{<id>}:rpm       string  GCRA arrival time (ms), expires when the bucket is full again
    agent:rl:{<id>}:tpm       string  same, for tokens
    agent:rl:{<id>}:streams   zset    open stream slots, score = expiry (ms); renewed while open,
                                      so a crashed worker's slots free themselves
    agent:ticket:{<nonce>}    string  a WebSocket ticket already used (single use)

Without Redis the same algorithms run in this process's memory.
"""

from __future__ import annotations

import time
from typing import Protocol

import redis.asyncio as aioredis


PERIOD_MS = 60_000
SLOT_TTL_MS = 30_000  # a stream slot not renewed for this long is free again

# KEYS: bucket   ARGV: interval_ms cost mode(charge|peek|force)   -> retry_after_ms (0 = allowed)
_GCRA = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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

# KEYS: zset   ARGV: slot max ttl_ms   -> 1 taken, 0 full
_SLOT_TAKE = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: zset   ARGV: slot ttl_ms
_SLOT_RENEW = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def bucket_key(identity: str, kind: str) -> str:
    return f"agent:rl:{{{identity}}}:{kind}"


class Limiter(Protocol):
    async def gcra(self, key: str, per_minute: int, cost: int, mode: str) -> float:
        """Seconds to wait (0: allowed; `charge` then counted it). mode: charge | peek | force."""

    async def take_slot(self, key: str, slot: str, limit: int) -> bool: ...

    async def renew_slot(self, key: str, slot: str) -> None: ...

    async def release_slot(self, key: str, slot: str) -> None: ...

    async def claim_once(self, name: str, ttl_seconds: int) -> bool:
        """True the first time `name` is claimed within ttl."""

    async def close(self) -> None: ...


class RedisLimiter:
    """The counters in Redis, on a client it is given (the store's, with its pool)."""

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis
        self._gcra = self.redis.register_script(_GCRA)
        self._take = self.redis.register_script(_SLOT_TAKE)
        self._renew = self.redis.register_script(_SLOT_RENEW)

    async def gcra(self, key: str, per_minute: int, cost: int, mode: str) -> float:
        wait_ms = await self._gcra(keys=[key], args=[PERIOD_MS / per_minute, cost, mode])
        return int(wait_ms) / 1000

    async def take_slot(self, key: str, slot: str, limit: int) -> bool:
        return bool(await self._take(keys=[key], args=[slot, limit, SLOT_TTL_MS]))

    async def renew_slot(self, key: str, slot: str) -> None:
        await self._renew(keys=[key], args=[slot, SLOT_TTL_MS])

    async def release_slot(self, key: str, slot: str) -> None:
        await self.redis.zrem(key, slot)

    async def claim_once(self, name: str, ttl_seconds: int) -> bool:
        return bool(await self.redis.set(f"agent:ticket:{{{name}}}", b"1", nx=True, ex=max(1, ttl_seconds)))

    async def close(self) -> None:
        pass  # the client belongs to the store


class MemoryLimiter:
    """One process (REDIS_URL unset, one worker): the same algorithms in dicts."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._claimed: dict[str, float] = {}
        self._sweep_at = 0.0

    @staticmethod
    def _now() -> float:
        return time.monotonic() * 1000

    def _sweep(self, now: float) -> None:
        if now < self._sweep_at:
            return
        self._sweep_at = now + PERIOD_MS
        self._tat = {k: v for k, v in self._tat.items() if v > now}
        self._claimed = {k: v for k, v in self._claimed.items() if v > now}

    async def gcra(self, key: str, per_minute: int, cost: int, mode: str) -> float:
        now = self._now()
        self._sweep(now)
        tat = max(self._tat.get(key, 0.0), now)
        new_tat = tat + PERIOD_MS / per_minute * cost
        if mode != "force" and new_tat - now > PERIOD_MS:
            return (new_tat - now - PERIOD_MS) / 1000
        if mode != "peek":
            self._tat[key] = new_tat
        return 0.0

    async def take_slot(self, key: str, slot: str, limit: int) -> bool:
        now = self._now()
        slots = {s: exp for s, exp in self._slots.get(key, {}).items() if exp > now}
        if len(slots) >= limit:
            self._slots[key] = slots
            return False
        slots[slot] = now + SLOT_TTL_MS
        self._slots[key] = slots
        return True

    async def renew_slot(self, key: str, slot: str) -> None:
        slots = self._slots.get(key)
        if slots is not None and slot in slots:
            slots[slot] = self._now() + SLOT_TTL_MS

    async def release_slot(self, key: str, slot: str) -> None:
        slots = self._slots.get(key)
        if slots is not None:
            slots.pop(slot, None)
            if not slots:
                del self._slots[key]

    async def claim_once(self, name: str, ttl_seconds: int) -> bool:
        now = self._now()
        self._sweep(now)
        if self._claimed.get(name, 0.0) > now:
            return False
        self._claimed[name] = now + ttl_seconds * 1000
        return True

    async def close(self) -> None:
        pass
