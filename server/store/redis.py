"""Redis store: history shared by every worker and machine, survives restarts.

Keys carry the session id as a hash tag (`agent:{<sid>}:…`) so every key of a session lives
in one Redis Cluster slot and the Lua scripts below stay legal there.

    agent:{sid}:meta          hash    owner, created, usage totals, cost, counters, turn ids
    agent:{sid}:msgs          list    one JSON message per element (API content blocks)
    agent:{sid}:turns         list    one JSON record per finished turn
    agent:{sid}:lock          string  id of the running turn, PX = lock TTL (renewed)
    agent:{sid}:log:{turn}    stream  the turn's events in batches: entry id 0-<last seq>, fields
                                      f (first seq), t (type of the last event), d (the events'
                                      JSON joined by newlines)
    agent:{sid}:mids          hash    client message_id -> "<turn id> <expiry (unix s)>" (idempotency)
    agent:cancel              channel turn ids to cancel, heard by every worker

Round trips per turn: one to begin (lock + history), one to finish (fenced commit + final
events), none per token; the running turns' event-log writes and lock renewals share one
round trip per flush interval (see housekeeping.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from ..events import Event
from ..usage import Usage
from .base import (ABANDONED_SEQ, BeginResult, Busy, CancelHandler, Duplicate, LogBatch, NotFound, SessionMeta,
                   SessionView, Started, StoredMessage, TurnCommit)
from .redis_channel import CommandChannel

log = logging.getLogger("server.store")

CANCEL_CHANNEL = "agent:cancel"
PIPELINE_TIMEOUT = 15.0  # as the pool's socket timeout: an unresponsive Redis fails the call

# KEYS: meta msgs lock mids turns   ARGV: turn owner create lock_ms ttl idem_ttl now message_id
# Ownership is checked before anything else: a `message_id` of another principal's session
# must answer exactly as a session that does not exist (no turn, no hint that it exists).
_BEGIN = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if ARGV[3] == '1' then
  if owner then return {'not_found'} end
  redis.call('DEL', KEYS[4])
  redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'created', ARGV[7])
elseif owner ~= ARGV[2] then
  return {'not_found'}
end
if ARGV[8] ~= '' then
  local seen = redis.call('HGET', KEYS[4], ARGV[8])
  if seen then
    local turn, expires = string.match(seen, '^(%S+) (%S+)$')
    if tonumber(expires) > tonumber(ARGV[7]) then return {'duplicate', turn} end
  end
end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then return {'busy', holder} end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[4])
local stale = redis.call('HGET', KEYS[1], 'active') or ''
if stale == ARGV[1] then stale = '' end
redis.call('HSET', KEYS[1], 'active', ARGV[1], 'last', ARGV[1])
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[8], ARGV[1] .. ' ' .. (tonumber(ARGV[7]) + tonumber(ARGV[6])))
  redis.call('EXPIRE', KEYS[4], ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[5], ARGV[5])
return {'started', redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1), stale}
"""

# KEYS: lock   ARGV: turn lock_ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: meta msgs lock turns log
# ARGV: turn nmsgs record in out cw cr cost last_in last_chars ttl log_ttl maxlen
#       first_seq last_seq last_type data msg*nmsgs
_FINISH = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  -- Not (or no longer) ours. A call retried after its reply was lost finds its own final
  -- event on top of the log: it did commit.
  local top = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
  if top[1] and top[1][1] == '0-' .. ARGV[15] then
    local fields = top[1][2]
    for j = 1, #fields, 2 do
      if fields[j] == 't' and fields[j + 1] == ARGV[16] then return 1 end
    end
  end
  return 0
end
local nmsgs = tonumber(ARGV[2])
for i = 18, 17 + nmsgs do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('RPUSH', KEYS[4], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'in', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'out', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'cw', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'cr', ARGV[7])
redis.call('HINCRBYFLOAT', KEYS[1], 'cost', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'turns', 1)
redis.call('HINCRBY', KEYS[1], 'nmsgs', nmsgs)
if ARGV[9] ~= '0' then redis.call('HSET', KEYS[1], 'last_in', ARGV[9], 'last_chars', ARGV[10]) end
redis.call('HDEL', KEYS[1], 'active')
redis.call('DEL', KEYS[3])
local top = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
local written = 0
if top[1] then written = tonumber(string.match(top[1][1], '-(%d+)$')) end
if tonumber(ARGV[15]) > written then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[13], '0-' .. ARGV[15], 'f', ARGV[14], 't', ARGV[16], 'd', ARGV[17])
end
redis.call('EXPIRE', KEYS[5], ARGV[12])
for k = 1, 4 do if k ~= 3 then redis.call('EXPIRE', KEYS[k], ARGV[11]) end end
return 1
"""

# KEYS: meta lock log   ARGV: turn error_fields log_ttl seq
# The error goes at a fixed sequence number above any real event's (`ABANDONED_SEQ`): the
# dead worker may have handed events to its own followers that never reached the log, so
# "the next number after the log's last" could name an event a client already has.
_ABANDON = """
if redis.call('GET', KEYS[2]) == ARGV[1] then return 0 end
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if last[1] then
  local fields = last[1][2]
  for j = 1, #fields, 2 do
    if fields[j] == 't' and (fields[j + 1] == 'turn_end' or fields[j + 1] == 'error') then return 0 end
  end
end
local data = '{"type":"error","id":"' .. ARGV[1] .. ':' .. ARGV[4] .. '",' .. ARGV[2] .. '}'
redis.call('XADD', KEYS[3], '0-' .. ARGV[4], 'f', ARGV[4], 't', 'error', 'd', data)
redis.call('EXPIRE', KEYS[3], ARGV[3])
if redis.call('HGET', KEYS[1], 'active') == ARGV[1] then redis.call('HDEL', KEYS[1], 'active') end
return 1
"""


def _k(session_id: str, name: str) -> str:
    return f"agent:{{{session_id}}}:{name}"


def _keys(session_id: str, *names: str) -> list[str]:
    return [_k(session_id, name) for name in names]


def _arg(value: bytes | str | int | float) -> bytes:
    """A command argument as redis-py would encode it."""
    if isinstance(value, bool) or not isinstance(value, (bytes, str, int, float)):
        raise TypeError(f"not a Redis argument: {value!r}")
    return value if isinstance(value, bytes) else str(value).encode()


def _command(*args: bytes) -> bytes:
    """One command in the Redis protocol (RESP): an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join([b"$%d\r\n%b\r\n" % (len(a), a) for a in args])


def _xadd(key: bytes, maxlen: bytes, seq: int, first_seq: int, type_: bytes, data: bytes) -> bytes:
    """`XADD key MAXLEN ~ maxlen 0-seq f first_seq t type d data`, encoded in one formatting
    step (the flush writes one per running turn, every EVENT_LOG_FLUSH_MS)."""
    entry_id, first = b"0-%d" % seq, b"%d" % first_seq
    return (b"*12\r\n$4\r\nXADD\r\n$%d\r\n%b\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
            b"$1\r\nf\r\n$%d\r\n%b\r\n$1\r\nt\r\n$%d\r\n%b\r\n$1\r\nd\r\n$%d\r\n%b\r\n"
            % (len(key), key, len(maxlen), maxlen, len(entry_id), entry_id, len(first), first,
               len(type_), type_, len(data), data))


def _evalsha(script: Any, keys: list[str], args: list[Any]) -> bytes:
    """EVALSHA of a registered script (its `sha`), encoded."""
    return _command(b"EVALSHA", script.sha.encode(), b"%d" % len(keys), *[_arg(a) for a in (*keys, *args)])


class RedisStore:
    def __init__(self, url: str, *, session_ttl: int, lock_ttl: float, log_ttl: int, log_maxlen: int,
                 idempotency_ttl: int, max_connections: int = 200):
        # A blocking pool: past max_connections a burst of commits waits instead of failing.
        # Socket timeouts (above followers' 1 s XREAD BLOCK): an unresponsive Redis fails a
        # request, once. A broken connection is retried on a fresh one: every command sent
        # is idempotent (a begin, commit or abandon that did run answers the same).
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2,
                      supported_errors=(RedisConnectionError,))
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=20,
                                                        health_check_interval=30, socket_timeout=15,
                                                        socket_connect_timeout=5, retry=retry)
        self.redis = aioredis.Redis(connection_pool=pool)
        # The per-turn scripts and the event-log flush share one connection (see redis_channel).
        self._channel = CommandChannel(pool, timeout=PIPELINE_TIMEOUT)
        self.session_ttl = session_ttl
        self.lock_ms = int(lock_ttl * 1000)
        self.log_ttl = log_ttl
        self.log_maxlen = log_maxlen
        self.idempotency_ttl = idempotency_ttl
        self._begin = self.redis.register_script(_BEGIN)
        self._renew = self.redis.register_script(_RENEW)
        self._finish = self.redis.register_script(_FINISH)
        self._abandon = self.redis.register_script(_ABANDON)
        self._listener: asyncio.Task[None] | None = None

    async def begin_turn(self, session_id: str, turn_id: str, *, owner: str, create: bool,
                         message_id: str | None) -> BeginResult:
        keys = _keys(session_id, "meta", "msgs", "lock", "mids", "turns")
        args = [turn_id, owner, int(create), self.lock_ms, self.session_ttl, self.idempotency_ttl,
                time.time(), message_id or ""]
        result = await self._run_script(self._begin, keys, args)
        status = result[0].decode()
        if status == "started":
            return Started(meta=_meta_from_hash(result[1]), history=[StoredMessage(m) for m in result[2]],
                           stale_turn_id=result[3].decode() or None)
        if status == "busy":
            return Busy(result[1].decode())
        if status == "duplicate":
            return Duplicate(result[1].decode())
        return NotFound()

    async def renew_lock(self, session_id: str, turn_id: str) -> bool:
        return bool(await self._renew(keys=[_k(session_id, "lock")], args=[turn_id, self.lock_ms]))

    async def flush(self, batches: list[LogBatch], renewals: list[tuple[str, str]]) -> list[bool]:
        """Every running turn's new events (one XADD each) and the due lock renewals, in one
        round trip. The hottest Redis path, so the commands are encoded here and written on
        the shared channel (redis-py's pipeline costs an encoder pass per argument and a
        timer per reply)."""
        maxlen = b"%d" % self.log_maxlen
        first_ttl = b"%d" % (self.log_ttl + 3600)
        commands: list[bytes] = []
        for b in batches:
            key = _k(b.session_id, f"log:{b.turn_id}").encode()
            events = b.events
            last = events[-1]
            commands.append(_xadd(key, maxlen, last.seq, events[0].seq, last.type.encode(),
                                  b"\n".join([e.data for e in events])))
            if b.first:
                # While the turn runs its log outlives a session's patience; a crashed worker's
                # log still expires. The commit sets the final TTL.
                commands.append(_command(b"EXPIRE", key, first_ttl))
        for session_id, turn_id in renewals:
            commands.append(_evalsha(self._renew, [_k(session_id, "lock")], [turn_id, self.lock_ms]))
        results = await self._channel.execute(commands) if commands else []
        split = len(results) - len(renewals)
        for result in results[:split]:
            # A retried flush may repeat an entry that did land: its id is refused, fine.
            if isinstance(result, Exception) and "equal or smaller" not in str(result):
                raise result
        renewed = results[split:]
        if any(isinstance(r, NoScriptError) for r in renewed):  # Redis restarted or was flushed
            return [await self.renew_lock(sid, tid) for sid, tid in renewals]
        return [not isinstance(r, Exception) and bool(r) for r in renewed]

    async def _run_script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA on the shared channel (the per-turn begin and commit); a Redis that lost its
        scripts (restart, SCRIPT FLUSH) gets them through redis-py."""
        (result,) = await self._channel.execute([_evalsha(script, keys, args)])
        if isinstance(result, NoScriptError):
            return await script(keys=keys, args=args)
        if isinstance(result, Exception):
            raise result
        return result

    async def finish_turn(self, session_id: str, turn_id: str, commit: TurnCommit) -> bool:
        keys = _keys(session_id, "meta", "msgs", "lock", "turns", f"log:{turn_id}")
        u = commit.usage
        events = commit.events
        args: list[Any] = [
            turn_id, len(commit.messages), json.dumps(commit.record, separators=(",", ":")),
            u.input_tokens, u.output_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens,
            repr(commit.cost_usd), commit.last_input_tokens, commit.last_input_chars,
            self.session_ttl, self.log_ttl, self.log_maxlen,
            events[0].seq, events[-1].seq, events[-1].type, b"\n".join(e.data for e in events),
        ]
        args.extend(json.dumps(m, ensure_ascii=False, separators=(",", ":")) for m in commit.messages)
        return bool(await self._run_script(self._finish, keys, args))

    async def abandon_turn(self, session_id: str, turn_id: str, error_fields: str) -> bool:
        keys = _keys(session_id, "meta", "lock", f"log:{turn_id}")
        return bool(await self._abandon(keys=keys, args=[turn_id, error_fields, self.log_ttl, ABANDONED_SEQ]))

    async def read_events(self, session_id: str, turn_id: str, after_seq: int,
                          block_ms: int) -> list[Event]:
        key = _k(session_id, f"log:{turn_id}")
        reply = await self.redis.xread({key: f"0-{after_seq}"}, count=1000,
                                       block=block_ms if block_ms > 0 else None)
        events: list[Event] = []
        for _stream, entries in reply or []:
            for _entry_id, fields in entries:
                seq = int(fields[b"f"])
                for data in fields[b"d"].split(b"\n"):
                    if seq > after_seq:
                        events.append(Event(seq, _type_of(data), f"{turn_id}:{seq}", data))
                    seq += 1
        return events

    async def has_log(self, session_id: str, turn_id: str) -> bool:
        return bool(await self.redis.exists(_k(session_id, f"log:{turn_id}")))

    async def lock_holder(self, session_id: str) -> str | None:
        holder = await self.redis.get(_k(session_id, "lock"))
        return holder.decode() if holder else None

    async def last_turn(self, session_id: str, owner: str) -> tuple[str | None, bool] | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(_k(session_id, "meta"), "owner", "last")
        pipe.get(_k(session_id, "lock"))
        (found_owner, last), holder = await pipe.execute()
        if found_owner is None or found_owner.decode() != owner:
            return None
        last_id = last.decode() if last else None
        return last_id, bool(holder) and holder.decode() == last_id

    async def get_session(self, session_id: str, owner: str) -> SessionView | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(_k(session_id, "meta"))
        pipe.lrange(_k(session_id, "msgs"), 0, -1)
        pipe.lrange(_k(session_id, "turns"), 0, -1)
        raw_meta, msgs, turns = await pipe.execute()
        if not raw_meta or raw_meta.get(b"owner", b"").decode() != owner:
            return None
        flat: list[bytes] = [x for kv in raw_meta.items() for x in kv]
        return SessionView(meta=_meta_from_hash(flat), history=[json.loads(m) for m in msgs],
                           turns=[json.loads(t) for t in turns])

    async def delete_session(self, session_id: str, owner: str) -> bool:
        found = await self.redis.hget(_k(session_id, "meta"), "owner")
        if found is None or found.decode() != owner:
            return False
        keys = _keys(session_id, "meta", "msgs", "turns", "lock", "mids")
        keys += [key async for key in self.redis.scan_iter(match=_k(session_id, "log:*"), count=500)]
        await self.redis.delete(*keys)
        return True

    async def publish_cancel(self, turn_id: str) -> None:
        await self.redis.publish(CANCEL_CHANNEL, turn_id)

    async def start(self, on_cancel: CancelHandler) -> None:
        """One pub/sub subscription per worker hears every cancel; no per-turn subscribe."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(CANCEL_CHANNEL)

        async def listen() -> None:
            lost = False  # said once per outage
            while True:
                try:
                    if lost:
                        await pubsub.subscribe(CANCEL_CHANNEL)
                        log.info("cancel listener subscribed again")
                        lost = False
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            result = on_cancel(message["data"].decode())
                            if asyncio.iscoroutine(result):
                                await result
                except asyncio.CancelledError:
                    await pubsub.aclose()
                    raise
                except (RedisError, OSError) as exc:
                    if not lost:
                        log.warning("cancel listener lost Redis (%s); resubscribing every second",
                                    type(exc).__name__)
                    lost = True
                    await asyncio.sleep(1.0)

        self._listener = asyncio.create_task(listen(), name="cancel-listener")

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), 2.0))
        except (RedisError, OSError, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, RedisError, OSError):
                pass
        await self._channel.close()
        await self.redis.aclose()


def _type_of(data: bytes) -> str:
    """Every event starts with `{"type":"<type>"`."""
    return data[9:data.index(b'"', 9)].decode()


def _meta_from_hash(flat: list[bytes]) -> SessionMeta:
    h = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
    return SessionMeta(
        owner=h.get("owner", ""),
        created_at=float(h.get("created", 0)),
        usage=Usage(int(h.get("in", 0)), int(h.get("out", 0)), int(h.get("cw", 0)), int(h.get("cr", 0))),
        cost_usd=float(h.get("cost", 0)),
        turns=int(h.get("turns", 0)),
        message_count=int(h.get("nmsgs", 0)),
        last_turn_id=h.get("last") or None,
        active_turn_id=h.get("active") or None,
        last_input_tokens=int(h.get("last_in", 0)),
        last_input_chars=int(h.get("last_chars", 0)),
    )
