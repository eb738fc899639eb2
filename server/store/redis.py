"""Redis store: history shared by every worker and machine, survives restarts.

Keys carry the session id as a hash tag (`agent:{<sid>}:…`) so every key of a session lives
in one Redis Cluster slot and the Lua scripts below stay legal there.

    agent:{sid}:meta          hash    owner, created, usage totals, cost, counters, turn ids, and the
                                      compaction summary (summary, sumupto: the messages it covers)
    agent:{sid}:msgs          list    one JSON message per element (API content blocks)
    agent:{sid}:turns         list    one JSON record per finished turn
    agent:{sid}:lock          string  id of the running turn, PX = lock TTL (renewed)
    agent:{sid}:log:{turn}    stream  the turn's events in batches: entry id 0-<last seq>, fields
                                      f (first seq), t (type of the last event), d (the events'
                                      JSON joined by newlines)
    agent:{sid}:mids          hash    client message_id -> "<turn id> <expiry (unix s)>" (idempotency)
    agent:{sid}:tools         hash    the tool calls the running turn waits for: turn (its id),
                                      p:<tool_use_id> (approval | client), a:<tool_use_id> (answer JSON)
    agent:sessions:{<tag>}    zset    a principal's sessions (the index of GET /sessions): member = session
                                      id, score = its last activity in unix ms; <tag> = a digest of the
                                      principal (store.base.principal_tag). Title, title source, preview
                                      and `updated` live in each session's meta hash.
    agent:cancel              channel turn ids to cancel, and "!<turn id>" for a turn whose waiting
                              tool calls got an answer, heard by every worker (on a cluster: the
                              sharded channel agent:{cancel})

Round trips per turn: one to begin (lock + history), one to finish (fenced commit + final
events; on a single Redis both scripts also write the sessions index), none per token; the
running turns' event-log writes and lock renewals share one round trip per flush interval
(see the Housekeeper in turns.py), one per master on a cluster.

Redis Cluster (`cluster=True`): redis-py's cluster client for everything but the hot commands,
which `ClusterRouter` sends to their slot's master (redis_channel.py). Every script touches
the keys of one hash tag, so it runs on one node. A principal's index has a tag of its own, so
it usually lives on another node than the session: a commit writes it in parallel with the
commit script (no added latency), a new session's entry is added just after its begin (in the
background: never before the session exists, so a listing never mistakes it for an expired one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from typing import Any, Iterable

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from .. import metrics
from ..events import Event
from ..usage import Usage
from .base import (ABANDONED_SEQ, ANSWERED, BeginResult, Busy, Duplicate, LogBatch, NoticeHandler, NotFound, Rewind,
                   RewindRefused, SessionMeta, SessionPage, SessionView, Started, StoredMessage, TurnCommit,
                   principal_tag)
from .redis_channel import ClusterRouter, NodeChannels, SingleRouter

log = logging.getLogger("server.store")

CANCEL_CHANNEL = "agent:cancel"
CLUSTER_CANCEL_CHANNEL = "agent:{cancel}"  # a sharded channel lives in a slot: tag it
WAIT_TIMEOUT_MS = 1000  # how long a commit waits for REDIS_WAIT_REPLICAS acknowledgements
LAGGING_SKIP_SECONDS = 5  # then how long that node's commits do not wait

# KEYS: meta msgs lock mids turns [index]   ARGV: turn owner create lock_ms ttl idem_ttl now message_id
#       title now_ms session_id rewind ('' | before | after | start) rewind_turn regenerate
#       (index: a single Redis only; on a cluster another node has it)
# A rewind is located among the turn records (each holds how many messages its turn appended)
# before the lock is taken, so a refused one leaves nothing to undo; the commit applies it.
# Ownership is checked before anything else: a `message_id` of another principal's session
# must answer exactly as a session that does not exist (no turn, no hint that it exists).
# Run twice (a retry after a lost reply, a failover), it answers the same: the session it
# created is its own (`last` is this turn) and so is the idempotency entry it wrote.
_BEGIN = """
local owner = redis.call('HGET', KEYS[1], 'owner')
local again = owner == ARGV[2] and redis.call('HGET', KEYS[1], 'last') == ARGV[1]
if ARGV[3] == '1' and not again then
  if owner then return {'not_found'} end
  redis.call('DEL', KEYS[4])
  redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'created', ARGV[7], 'updated', ARGV[10])
  if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'title', ARGV[9], 'tsrc', 'message') end
  if KEYS[6] then
    redis.call('ZADD', KEYS[6], ARGV[10], ARGV[11])
    redis.call('EXPIRE', KEYS[6], ARGV[5])
  end
elseif owner ~= ARGV[2] then
  return {'not_found'}
end
if ARGV[8] ~= '' then
  local turn, expires = string.match(redis.call('HGET', KEYS[4], ARGV[8]) or '', '^(%S+) (%S+)$')
  if turn and turn ~= ARGV[1] and tonumber(expires) > tonumber(ARGV[7]) then return {'duplicate', turn} end
end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then return {'busy', holder} end
local cut, kept, rewound = -1, 0, {}
if ARGV[12] ~= '' then
  local at, found = 0, ARGV[12] == 'start'
  if found then cut = 0 end
  for i, raw in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do
    local r = cjson.decode(raw)
    local n = tonumber(r['messages']) or 0
    if found then
      table.insert(rewound, r['turn_id'])
    elseif r['turn_id'] == ARGV[13] then
      found = true
      if ARGV[12] == 'before' then
        if ARGV[14] == '1' and n == 0 then return {'nothing_to_regenerate'} end
        cut, kept = at, i - 1
        table.insert(rewound, r['turn_id'])
      else
        cut, kept = at + n, i
      end
    end
    at = at + n
  end
  if not found then return {'turn_not_found'} end
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[4])
local stale = redis.call('HGET', KEYS[1], 'active') or ''
if stale == ARGV[1] then stale = '' end
redis.call('HSET', KEYS[1], 'active', ARGV[1], 'last', ARGV[1])
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[8], ARGV[1] .. ' ' .. (tonumber(ARGV[7]) + tonumber(ARGV[6])))
  redis.call('EXPIRE', KEYS[4], ARGV[5])
end
for _, k in ipairs({1, 2, 5}) do redis.call('EXPIRE', KEYS[k], ARGV[5]) end
return {'started', redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1), stale, cut, kept, rewound}
"""

# KEYS: lock   ARGV: turn lock_ms
_RENEW = "return redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('PEXPIRE', KEYS[1], ARGV[2]) or 0"

# KEYS: meta msgs lock turns log [index]
# ARGV: turn nmsgs record in out cw cr cost last_in last_chars ttl log_ttl maxlen
#       first_seq last_seq last_type data preview now_ms session_id cut kept_turns
#       summary_op ('' | set | del) summary summary_upto title msg*nmsgs
# A rewind (cut >= 0) trims the history and the turn records before the append.
# An entry's fields are always f, t, d in that order: its type is the 4th element.
_FINISH = """
local top = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)[1]
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  -- Not (or no longer) ours. A call retried after its reply was lost finds its own final
  -- event on top of the log: it did commit.
  return (top and top[1] == '0-' .. ARGV[15] and top[2][4] == ARGV[16]) and 1 or 0
end
local nmsgs = tonumber(ARGV[2])
local cut = tonumber(ARGV[21])
if cut >= 0 then
  if cut == 0 then redis.call('DEL', KEYS[2]) else redis.call('LTRIM', KEYS[2], 0, cut - 1) end
  local kept = tonumber(ARGV[22])
  if kept == 0 then redis.call('DEL', KEYS[4]) else redis.call('LTRIM', KEYS[4], 0, kept - 1) end
  redis.call('HSET', KEYS[1], 'nmsgs', cut, 'turns', kept)
end
if ARGV[23] == 'set' then
  redis.call('HSET', KEYS[1], 'summary', ARGV[24], 'sumupto', ARGV[25])
elseif ARGV[23] == 'del' then
  redis.call('HDEL', KEYS[1], 'summary', 'sumupto')
end
if ARGV[26] ~= '' and redis.call('HGET', KEYS[1], 'tsrc') == 'message' then
  redis.call('HSET', KEYS[1], 'title', ARGV[26])
end
for i = 27, 26 + nmsgs do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('RPUSH', KEYS[4], ARGV[3])
for i, name in ipairs({'in', 'out', 'cw', 'cr'}) do redis.call('HINCRBY', KEYS[1], name, ARGV[3 + i]) end
redis.call('HINCRBYFLOAT', KEYS[1], 'cost', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'turns', 1)
redis.call('HINCRBY', KEYS[1], 'nmsgs', nmsgs)
if ARGV[9] ~= '0' then redis.call('HSET', KEYS[1], 'last_in', ARGV[9], 'last_chars', ARGV[10]) end
redis.call('HDEL', KEYS[1], 'active')
if ARGV[18] ~= '' then redis.call('HSET', KEYS[1], 'preview', ARGV[18]) end
redis.call('HSET', KEYS[1], 'updated', ARGV[19])
if KEYS[6] then
  redis.call('ZADD', KEYS[6], ARGV[19], ARGV[20])
  redis.call('EXPIRE', KEYS[6], ARGV[11])
end
redis.call('DEL', KEYS[3])
if tonumber(ARGV[15]) > (top and tonumber(string.match(top[1], '-(%d+)$')) or 0) then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[13], '0-' .. ARGV[15], 'f', ARGV[14], 't', ARGV[16], 'd', ARGV[17])
end
redis.call('EXPIRE', KEYS[5], ARGV[12])
for k = 1, 4 do if k ~= 3 then redis.call('EXPIRE', KEYS[k], ARGV[11]) end end
return 1
"""

# KEYS: meta lock log   ARGV: turn error_fields log_ttl seq (ABANDONED_SEQ: see why in base.py)
_ABANDON = """
if redis.call('GET', KEYS[2]) == ARGV[1] then return 0 end
local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
if top and (top[2][4] == 'turn_end' or top[2][4] == 'error') then return 0 end
local data = '{"type":"error","id":"' .. ARGV[1] .. ':' .. ARGV[4] .. '",' .. ARGV[2] .. '}'
redis.call('XADD', KEYS[3], '0-' .. ARGV[4], 'f', ARGV[4], 't', 'error', 'd', data)
redis.call('EXPIRE', KEYS[3], ARGV[3])
if redis.call('HGET', KEYS[1], 'active') == ARGV[1] then redis.call('HDEL', KEYS[1], 'active') end
return 1
"""

# KEYS: tools lock   ARGV: turn ttl_ms kind-pairs...
_WAIT_TOOLS = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'turn', ARGV[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: meta lock tools   ARGV: owner tool_use_id kind answer
# Fenced as a commit is: only while the turn that waits still holds the session's lock.
_ANSWER_TOOL = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return {'not_found'} end
local turn = redis.call('HGET', KEYS[3], 'turn')
if not turn or redis.call('GET', KEYS[2]) ~= turn then return {'not_pending'} end
local kind = redis.call('HGET', KEYS[3], 'p:' .. ARGV[2])
if not kind then return {'not_pending'} end
if kind ~= ARGV[3] then return {'wrong_kind', kind} end
if redis.call('HSETNX', KEYS[3], 'a:' .. ARGV[2], ARGV[4]) == 0 then return {'answered'} end
return {'ok', turn}
"""

# KEYS: meta   ARGV: owner title
_RENAME = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'title', ARGV[2], 'tsrc', 'user')
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: meta   ARGV: owner title in out cw cr cost
# The title model's answer: replaces only a title taken from the first message; its usage counts.
_MODEL_TITLE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'tsrc') == 'message' then
  redis.call('HSET', KEYS[1], 'title', ARGV[2], 'tsrc', 'model')
end
for i, name in ipairs({'in', 'out', 'cw', 'cr'}) do redis.call('HINCRBY', KEYS[1], name, ARGV[2 + i]) end
redis.call('HINCRBYFLOAT', KEYS[1], 'cost', ARGV[7])
return 1
"""

# KEYS: tools   ARGV: turn close
_TOOL_ANSWERS = """
if redis.call('HGET', KEYS[1], 'turn') ~= ARGV[1] then return {} end
local all = redis.call('HGETALL', KEYS[1])
if ARGV[2] == '1' then redis.call('DEL', KEYS[1]) end
return all
"""


def _k(session_id: str, name: str) -> str:
    return f"agent:{{{session_id}}}:{name}"


def _keys(session_id: str, *names: str) -> list[str]:
    return [_k(session_id, name) for name in names]


def _index_key(owner: str) -> str:
    return f"agent:sessions:{{{principal_tag(owner)}}}"


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


def _script_load(script: Any) -> bytes:
    """SCRIPT LOAD of a registered script: sent before its EVALSHA to a node that lacks it."""
    return _command(b"SCRIPT", b"LOAD", script.script.encode())


def _evalsha(script: Any, keys: list[str], args: list[bytes | str | int | float]) -> bytes:
    """EVALSHA of a registered script, its arguments encoded as redis-py would."""
    for value in args:
        if isinstance(value, bool) or not isinstance(value, (bytes, str, int, float)):
            raise TypeError(f"not a Redis argument: {value!r}")
    encoded = [a if isinstance(a, bytes) else str(a).encode() for a in (*keys, *args)]
    return _command(b"EVALSHA", script.sha.encode(), b"%d" % len(keys), *encoded)


class RedisStore:
    def __init__(self, url: str, *, session_ttl: int, lock_ttl: float, log_ttl: int, log_maxlen: int,
                 idempotency_ttl: int, max_connections: int = 200, cluster: bool = False,
                 tls: dict[str, str] | None = None, wait_replicas: int = 0):
        # Socket timeouts (above followers' 1 s XREAD BLOCK): an unresponsive Redis fails a
        # request, once. A broken connection is retried on a fresh one: every command sent
        # is idempotent (a begin, commit or abandon that did run answers the same).
        # `tls`: redis-py's ssl_* arguments (CA, client certificate), for rediss:// URLs.
        options: dict[str, Any] = dict(health_check_interval=30, socket_timeout=15, socket_connect_timeout=5,
                                       **(tls or {}))
        self.redis: aioredis.Redis | RedisCluster
        if cluster:
            # The cluster client retries a failed node on a reloaded slot map itself. Its pools
            # do not block: past max_connections per node a command fails.
            self.redis = RedisCluster.from_url(url, max_connections=max_connections, **options)
            self._router: SingleRouter | ClusterRouter = ClusterRouter(self.redis, timeout=15.0)
        else:
            # A blocking pool: past max_connections a burst of commits waits instead of failing.
            retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2,
                          supported_errors=(RedisConnectionError,))
            pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=20,
                                                            retry=retry, **options)
            self.redis = aioredis.Redis(connection_pool=pool)
            # begin, commit and flush; timeout as the pool's
            self._router = SingleRouter(NodeChannels(pool.connection_class, pool.connection_kwargs, timeout=15.0))
        self.wait_replicas = wait_replicas
        self._wait = _command(b"WAIT", b"%d" % wait_replicas, b"%d" % WAIT_TIMEOUT_MS) if wait_replicas else None
        self._wait_warned_at = -math.inf
        self._lagging: dict[str, float] = {}  # node -> until when its commits skip WAIT
        self.session_ttl = session_ttl
        self.lock_ms = int(lock_ttl * 1000)
        self.log_ttl = log_ttl
        self.log_maxlen = log_maxlen
        self.idempotency_ttl = idempotency_ttl
        self._begin, self._renew, self._finish, self._abandon = map(self.redis.register_script,
                                                                    (_BEGIN, _RENEW, _FINISH, _ABANDON))
        self._wait_tools, self._answer_tool, self._tool_answers, self._rename, self._model_title = map(
            self.redis.register_script, (_WAIT_TOOLS, _ANSWER_TOOL, _TOOL_ANSWERS, _RENAME, _MODEL_TITLE))
        self._listener: asyncio.Task[None] | None = None
        self.cluster = cluster
        self._index_writes: set[asyncio.Task[None]] = set()  # (cluster) new sessions' index entries
        self._index_warned_at = -math.inf

    async def begin_turn(self, session_id: str, turn_id: str, *, owner: str, create: bool,
                         message_id: str | None, title: str | None = None, rewind: Rewind | None = None,
                         regenerate: bool = False) -> BeginResult:
        keys = _keys(session_id, "meta", "msgs", "lock", "mids", "turns")
        index = _index_key(owner) if create else None
        if index is not None and not self.cluster:
            keys.append(index)
        now = time.time()
        now_ms = int(now * 1000)
        args = [turn_id, owner, int(create), self.lock_ms, self.session_ttl, self.idempotency_ttl,
                now, message_id or "", title or "", now_ms, session_id, *_rewind_args(rewind, regenerate)]
        status, *result = (await self._run_script(self._begin, keys, args))[0]
        if status == b"started":
            fields, history, stale, cut, kept, rewound = result
            meta = _meta_from_hash(zip(fields[::2], fields[1::2]))
            if index is not None and self.cluster and meta.turns == 0:  # (new: NX keeps an entry's order)
                self._index_in_background(index, [_command(b"ZADD", index.encode(), b"NX", b"%d" % now_ms,
                                                           session_id.encode()),
                                                  _command(b"EXPIRE", index.encode(), b"%d" % self.session_ttl)])
            return Started(meta=meta, history=[StoredMessage(m) for m in history],
                           stale_turn_id=stale.decode() or None, cut=cut if cut >= 0 else None, kept_turns=kept,
                           rewound=[t.decode() for t in rewound])
        if status == b"not_found":
            return NotFound()
        if status in (b"turn_not_found", b"nothing_to_regenerate"):
            return RewindRefused(status.decode())
        return (Busy if status == b"busy" else Duplicate)(result[0].decode())

    async def renew_lock(self, session_id: str, turn_id: str) -> bool:
        return bool((await self._run_script(self._renew, [_k(session_id, "lock")], [turn_id, self.lock_ms]))[0])

    async def flush(self, batches: list[LogBatch], renewals: list[tuple[str, str]]) -> list[bool]:
        """Every running turn's new events (one XADD each) and the due lock renewals, in one
        round trip. The hottest Redis path, so the commands are encoded here and written on
        the shared channel (redis-py's pipeline costs an encoder pass per argument and a
        timer per reply)."""
        maxlen = b"%d" % self.log_maxlen
        first_ttl = b"%d" % (self.log_ttl + 3600)
        groups: list[tuple[bytes, list[bytes]]] = []
        for b in batches:
            key = _k(b.session_id, f"log:{b.turn_id}").encode()
            last = b.events[-1]
            commands = [_xadd(key, maxlen, last.seq, b.events[0].seq, last.type.encode(),
                              b"\n".join([e.data for e in b.events]))]
            if b.first:
                # While the turn runs its log outlives a session's patience; a crashed worker's
                # log still expires. The commit sets the final TTL.
                commands.append(_command(b"EXPIRE", key, first_ttl))
            groups.append((key, commands))
        for sid, tid in renewals:
            # The lock, and the running turn's log with it: a turn streaming longer than the
            # log's first TTL keeps it.
            lock = _k(sid, "lock")
            groups.append((lock.encode(), [_evalsha(self._renew, [lock], [tid, self.lock_ms]),
                                           _command(b"EXPIRE", _k(sid, f"log:{tid}").encode(), first_ttl)]))
        results = await self._router.execute_groups(groups) if groups else []
        for replies in results[:len(batches)]:
            for result in replies:
                # A retried flush may repeat an entry that did land: its id is refused, fine.
                if isinstance(result, Exception) and "equal or smaller" not in str(result):
                    raise result
        renewed = [replies[0] for replies in results[len(batches):]]
        if any(isinstance(r, NoScriptError) for r in renewed):  # a restart, a SCRIPT FLUSH, a failover
            load = _script_load(self._renew)
            again = await self._router.execute_groups([(key, [load, *commands]) for key, commands in groups[len(batches):]])
            renewed = [replies[1] for replies in again]
        return [not isinstance(r, Exception) and bool(r) for r in renewed]

    async def _run_script(self, script: Any, keys: list[str], args: list[Any], wait: bytes | None = None) -> list[Any]:
        """EVALSHA on the shared channel: [the script's result]. With `wait` (a WAIT command),
        both in one write on a connection of their own (WAIT holds it): [result, replicas].
        A node without the script (a restart, SCRIPT FLUSH, a promoted replica: Redis 7 does
        not replicate its script cache) gets SCRIPT LOAD in front of the same write."""
        key = keys[0].encode()
        commands = [_evalsha(script, keys, args), *([wait] if wait else [])]
        replies = await self._router.execute(key, commands, holding=wait is not None)
        if isinstance(replies[0], NoScriptError):
            replies = (await self._router.execute(key, [_script_load(script), *commands], holding=wait is not None))[1:]
        if isinstance(replies[0], Exception):
            raise replies[0]
        return replies

    async def finish_turn(self, session_id: str, turn_id: str, commit: TurnCommit) -> bool:
        keys = _keys(session_id, "meta", "msgs", "lock", "turns", f"log:{turn_id}")
        index = _index_key(commit.owner) if commit.owner else None
        if index is not None and not self.cluster:
            keys.append(index)
        now_ms = int(time.time() * 1000)
        u = commit.usage
        events = commit.events
        args: list[Any] = [
            turn_id, len(commit.messages), json.dumps(commit.record, separators=(",", ":")),
            u.input_tokens, u.output_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens,
            repr(commit.cost_usd), commit.last_input_tokens, commit.last_input_chars,
            self.session_ttl, self.log_ttl, self.log_maxlen,
            events[0].seq, events[-1].seq, events[-1].type, b"\n".join(e.data for e in events),
            commit.preview, now_ms, session_id, -1 if commit.cut is None else commit.cut, commit.kept_turns,
            "" if commit.summary is None else "set" if commit.summary else "del", commit.summary or "",
            commit.summary_upto, commit.title,
        ]
        args.extend(json.dumps(m, ensure_ascii=False, separators=(",", ":")) for m in commit.messages)
        # With wait_replicas, WAIT in the same write: the commit is on that many replicas
        # before the client hears of it, so a failover (which promotes a replica) keeps it. A
        # node whose replicas did not answer in time commits without waiting for a while, so
        # a replica outage does not cost every commit the full wait.
        node = self._router.node_of(keys[0].encode()) if self._wait else ""
        now = time.monotonic()
        wait = self._wait if self._wait and self._lagging.get(node, 0.0) <= now else None
        if index is not None and self.cluster:
            # The index lives on another node: written in parallel (not fenced: an entry whose
            # session is gone is dropped by the next listing).
            done, _indexed = await asyncio.gather(
                self._run_script(self._finish, keys, args, wait),
                self._write_index(index, [_command(b"ZADD", index.encode(), b"%d" % now_ms, session_id.encode()),
                                          _command(b"EXPIRE", index.encode(), b"%d" % self.session_ttl)]),
                return_exceptions=True)
            if isinstance(done, BaseException):
                raise done
            committed, *acked = done
        else:
            committed, *acked = await self._run_script(self._finish, keys, args, wait)
        if committed and self._wait and (not acked or isinstance(acked[0], Exception) or acked[0] < self.wait_replicas):
            metrics.store_replication_lagged()
            if acked:  # (a timed-out WAIT, not a skipped one)
                self._lagging[node] = now + LAGGING_SKIP_SECONDS
                if now - self._wait_warned_at >= 30:
                    self._wait_warned_at = now
                    log.warning("a commit reached %s of %d replicas within %d ms (REDIS_WAIT_REPLICAS): a "
                                "failover now could lose it; commits there wait for none for %d s",
                                acked[0], self.wait_replicas, WAIT_TIMEOUT_MS, LAGGING_SKIP_SECONDS)
        return bool(committed)

    async def _write_index(self, index: str, commands: list[bytes]) -> None:
        """(Cluster) Write a principal's index; a failure is logged, never raised: the session
        stays out of the list (or in its old place) until its next commit."""
        try:
            for reply in await self._router.execute(index.encode(), commands):
                if isinstance(reply, Exception):
                    raise reply
        except Exception as exc:  # noqa: BLE001 — the listing is not worth failing a turn for
            now = time.monotonic()
            if now - self._index_warned_at >= 30:
                self._index_warned_at = now
                log.warning("could not update a sessions index (%s: %s)", type(exc).__name__, str(exc)[:200])

    def _index_in_background(self, index: str, commands: list[bytes]) -> None:
        task = asyncio.create_task(self._write_index(index, commands), name="sessions-index")
        self._index_writes.add(task)
        task.add_done_callback(self._index_writes.discard)

    async def abandon_turn(self, session_id: str, turn_id: str, error_fields: str) -> bool:
        keys = _keys(session_id, "meta", "lock", f"log:{turn_id}")
        return bool((await self._run_script(self._abandon, keys, [turn_id, error_fields, self.log_ttl, ABANDONED_SEQ]))[0])

    async def read_events(self, session_id: str, turn_id: str, after_seq: int,
                          block_ms: int) -> list[Event]:
        reply = await self.redis.xread({_k(session_id, f"log:{turn_id}"): f"0-{after_seq}"}, count=1000,
                                       block=block_ms if block_ms > 0 else None)
        events: list[Event] = []
        for _stream, entries in reply or []:
            for _entry_id, fields in entries:
                seq = int(fields[b"f"])
                for data in fields[b"d"].split(b"\n"):  # each event starts with `{"type":"<type>"`
                    if seq > after_seq:
                        events.append(Event(seq, data[9:data.index(b'"', 9)].decode(), f"{turn_id}:{seq}", data))
                    seq += 1
        return events

    async def has_log(self, session_id: str, turn_id: str) -> bool:
        return bool(await self.redis.exists(_k(session_id, f"log:{turn_id}")))

    async def lock_holder(self, session_id: str) -> str | None:
        holder = await self.redis.get(_k(session_id, "lock"))
        return holder.decode() if holder else None

    async def last_turn(self, session_id: str, owner: str) -> tuple[str | None, bool] | None:
        pipe = self.redis.pipeline(transaction=False).hmget(_k(session_id, "meta"), "owner", "last")
        (found_owner, last), holder = await pipe.get(_k(session_id, "lock")).execute()
        if found_owner != owner.encode():
            return None
        return (last.decode() if last else None), bool(last) and holder == last

    async def get_session(self, session_id: str, owner: str) -> SessionView | None:
        meta, msgs, turns = _keys(session_id, "meta", "msgs", "turns")
        pipe = self.redis.pipeline(transaction=False).hgetall(meta).lrange(msgs, 0, -1).lrange(turns, 0, -1)
        raw_meta, raw_msgs, raw_turns = await pipe.execute()
        if raw_meta.get(b"owner") != owner.encode():
            return None
        return SessionView(meta=_meta_from_hash(raw_meta.items()), history=[json.loads(m) for m in raw_msgs],
                           turns=[json.loads(t) for t in raw_turns])

    async def delete_session(self, session_id: str, owner: str) -> bool:
        if await self.redis.hget(_k(session_id, "meta"), "owner") != owner.encode():
            return False
        keys = _keys(session_id, "meta", "msgs", "turns", "lock", "mids", "tools")
        # (on a cluster, only the session's node holds its keys)
        where = {"target_nodes": self.redis.get_node_from_key(keys[0])} if isinstance(self.redis, RedisCluster) else {}
        keys += [key async for key in self.redis.scan_iter(match=_k(session_id, "log:*"), count=500, **where)]
        await self.redis.delete(*keys)
        await self.redis.zrem(_index_key(owner), session_id)
        return True

    async def list_sessions(self, owner: str, limit: int, after: tuple[int, str] | None) -> SessionPage:
        """A page of the owner's index, each entry's meta read in one pipeline (on a cluster: one
        round trip per node holding some). Entries whose meta is gone (expired) or belongs to
        someone else (an id reused after expiry) are dropped from the index, and the page
        filled from further down."""
        index, found, position = _index_key(owner), [], after
        while len(found) <= limit:
            entries, more = await self._index_page(index, position, limit + 1 - len(found))
            if not entries:
                break
            pipe = self.redis.pipeline(transaction=False)
            for sid, _ms in entries:
                pipe.hgetall(_k(sid, "meta"))
            gone = []
            for (sid, ms), raw in zip(entries, await pipe.execute()):
                if raw.get(b"owner") != owner.encode():
                    gone.append(sid)
                    continue
                meta = _meta_from_hash(raw.items())
                meta.updated_ms = ms  # (the order the index gives, which the cursor follows)
                found.append((sid, meta))
            if gone:
                await self.redis.zrem(index, *gone)
            position = (entries[-1][1], entries[-1][0])
            if not more:
                break
        if len(found) > limit:
            last_sid, last = found[limit - 1]
            return SessionPage(found[:limit], (last.updated_ms, last_sid))
        return SessionPage(found, None)

    async def _index_page(self, index: str, after: tuple[int, str] | None,
                          count: int) -> tuple[list[tuple[str, int]], bool]:
        """Up to `count` (session id, ms) of the index after `after`, newest first (ms desc, then
        id desc, as ZREVRANGE orders equal scores), and whether more may follow."""
        if after is None:
            rows = await self.redis.zrevrange(index, 0, count - 1, withscores=True)
            return [(m.decode(), int(score)) for m, score in rows], len(rows) == count
        ms, sid = after
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrangebyscore(index, ms, ms)  # the same ms as the cursor: only those after its id
        pipe.zrevrangebyscore(index, f"({ms}", "-inf", start=0, num=count, withscores=True)
        same, below = await pipe.execute()
        entries = [(m, ms) for m in sorted((m.decode() for m in same), reverse=True) if m < sid]
        entries += [(m.decode(), int(score)) for m, score in below]
        return entries[:count], len(entries) >= count

    async def rename_session(self, session_id: str, owner: str, title: str) -> SessionMeta | None:
        fields = (await self._run_script(self._rename, [_k(session_id, "meta")], [owner, title]))[0]
        return _meta_from_hash(zip(fields[::2], fields[1::2])) if fields else None

    async def add_model_title(self, session_id: str, owner: str, title: str, usage: Usage,
                              cost_usd: float) -> bool:
        args = [owner, title, usage.input_tokens, usage.output_tokens, usage.cache_creation_input_tokens,
                usage.cache_read_input_tokens, repr(cost_usd)]
        return bool((await self._run_script(self._model_title, [_k(session_id, "meta")], args))[0])

    async def publish_cancel(self, turn_id: str) -> None:
        if isinstance(self.redis, RedisCluster):
            await self.redis.spublish(CLUSTER_CANCEL_CHANNEL, turn_id)
        else:
            await self.redis.publish(CANCEL_CHANNEL, turn_id)

    async def wait_for_tools(self, session_id: str, turn_id: str, calls: dict[str, str], ttl: float) -> None:
        pairs = [x for call, kind in calls.items() for x in (f"p:{call}", kind)]
        await self._run_script(self._wait_tools, _keys(session_id, "tools", "lock"),
                               [turn_id, int(ttl * 1000), *pairs])

    async def answer_tool(self, session_id: str, owner: str, tool_use_id: str, kind: str,
                          answer: str) -> tuple[str, str | None]:
        status, *detail = (await self._run_script(self._answer_tool, _keys(session_id, "meta", "lock", "tools"),
                                                  [owner, tool_use_id, kind, answer]))[0]
        return status.decode(), detail[0].decode() if detail else None

    async def tool_answers(self, session_id: str, turn_id: str, close: bool) -> dict[str, str]:
        flat = (await self._run_script(self._tool_answers, [_k(session_id, "tools")], [turn_id, int(close)]))[0]
        return {k[2:].decode(): v.decode() for k, v in zip(flat[::2], flat[1::2]) if k.startswith(b"a:")}

    async def waiting_tools(self, session_id: str, owner: str) -> tuple[str | None, dict[str, str]] | None:
        pipe = self.redis.pipeline(transaction=False).hget(_k(session_id, "meta"), "owner")
        found_owner, holder, waiting = await pipe.get(_k(session_id, "lock")).hgetall(_k(session_id, "tools")).execute()
        if found_owner != owner.encode():
            return None
        running = holder.decode() if holder else None
        if running is None or waiting.get(b"turn") != holder:
            return running, {}
        return running, {k[2:].decode(): v.decode() for k, v in waiting.items()
                         if k.startswith(b"p:") and b"a:" + k[2:] not in waiting}

    async def notify_answered(self, turn_id: str) -> None:
        await self.publish_cancel(ANSWERED + turn_id)

    async def start(self, on_notice: NoticeHandler) -> None:
        """One pub/sub subscription per worker hears every cancel; no per-turn subscribe.

        On a cluster, a sharded channel (SSUBSCRIBE): served by its slot's master (and
        replicas) instead of a classic channel's broadcast to every node. A subscription whose
        node fails or restarts is made again, on a new connection (on a cluster: on the slot's
        new master), every half second until it works; a cancel published in between is lost.
        """
        if isinstance(self.redis, RedisCluster):
            cluster = self.redis
            await cluster.initialize()  # (the slot map: which master serves the channel)

            async def subscribe() -> Any:
                pubsub = cluster.pubsub()
                await pubsub.ssubscribe(CLUSTER_CANCEL_CHANNEL)
                return pubsub

            def receive(pubsub: Any) -> Any:
                return pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=1.0)
        else:
            single = self.redis

            async def subscribe() -> Any:
                pubsub = single.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(CANCEL_CHANNEL)
                return pubsub

            def receive(pubsub: Any) -> Any:
                return pubsub.get_message(timeout=1.0)

        first = await subscribe()

        async def listen() -> None:
            pubsub, lost = first, False  # (said once per outage)
            while True:
                try:
                    if pubsub is None:
                        pubsub = await asyncio.wait_for(subscribe(), 5.0)
                        log.info("cancel listener subscribed again")
                        lost = False
                    message = await receive(pubsub)
                    if message and message.get("type") in ("message", "smessage"):
                        on_notice(message["data"].decode())
                except asyncio.CancelledError:
                    if pubsub is not None:
                        await pubsub.aclose()
                    raise
                except (RedisError, OSError, asyncio.TimeoutError) as exc:
                    if not lost:
                        log.warning("cancel listener lost Redis (%s); subscribing again", type(exc).__name__)
                    lost = True
                    if pubsub is not None:
                        with contextlib.suppress(RedisError, OSError):
                            await pubsub.aclose()
                    pubsub = None
                    await asyncio.sleep(0.5)

        self._listener = asyncio.create_task(listen(), name="cancel-listener")

    async def ping(self) -> bool:
        # On a cluster, one node: a shard failing over must not take every server out of its
        # load balancer (the other shards' sessions still work).
        where = {"target_nodes": RedisCluster.RANDOM} if isinstance(self.redis, RedisCluster) else {}
        try:
            return bool(await asyncio.wait_for(self.redis.ping(**where), 2.0))
        except (RedisError, OSError, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        if self._index_writes:
            await asyncio.wait(self._index_writes, timeout=2.0)
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await self._listener
        await self._router.close()
        await self.redis.aclose()


def _meta_from_hash(pairs: Iterable[tuple[bytes, bytes]]) -> SessionMeta:
    h = {k.decode(): v.decode() for k, v in pairs}
    n = {k: int(h.get(k, 0)) for k in ("in", "out", "cw", "cr", "turns", "nmsgs", "last_in", "last_chars")}
    return SessionMeta(owner=h.get("owner", ""), created_at=float(h.get("created", 0)), turns=n["turns"],
                       usage=Usage(n["in"], n["out"], n["cw"], n["cr"]), cost_usd=float(h.get("cost", 0)),
                       last_turn_id=h.get("last") or None, active_turn_id=h.get("active") or None,
                       message_count=n["nmsgs"], last_input_tokens=n["last_in"], last_input_chars=n["last_chars"],
                       title=h.get("title"), title_source=h.get("tsrc"), preview=h.get("preview", ""),
                       updated_ms=int(h.get("updated", 0)), summary=h.get("summary"),
                       summary_upto=int(h.get("sumupto", 0)))


def _rewind_args(rewind: Rewind | None, regenerate: bool) -> list[str]:
    """The begin script's last three arguments: how the turn rewinds the session, if it does."""
    if rewind is None:
        return ["", "", ""]
    mode = "start" if rewind.turn_id is None else "after" if rewind.keep else "before"
    return [mode, rewind.turn_id or "", "1" if regenerate else ""]
