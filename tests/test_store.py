"""Every store backend keeps the same contract (memory for one process, Redis or a Redis
Cluster for many)."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .harness import eventually

from server.events import encode
from server.store.base import (ABANDONED_SEQ, Busy, Duplicate, LogBatch, NotFound, Started, TurnCommit, new_id,
                               principal_tag)
from server.store.memory import MemoryStore
from server.store.redis import RedisStore, _command
from server.usage import Usage

LOCK_TTL = 0.3


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request, redis_url):
    kw = dict(lock_ttl=LOCK_TTL, log_ttl=60, log_maxlen=1000, idempotency_ttl=60)
    if request.param == "memory":
        s = MemoryStore(session_ttl=3600, **kw)
    elif request.param == "cluster":
        s = RedisStore(request.getfixturevalue("redis_cluster").url, cluster=True, session_ttl=3600, **kw)
    else:
        s = RedisStore(redis_url, session_ttl=3600, **kw)
    yield s
    await s.close()


def commit(turn_id: str, text: str, seq: int) -> TurnCommit:
    return TurnCommit(
        messages=[{"role": "user", "content": [{"type": "text", "text": "q"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": text}]}],
        record={"turn_id": turn_id, "status": "completed"}, usage=Usage(10, 5, 2, 3), cost_usd=0.25,
        last_input_tokens=15, last_input_chars=60,
        events=[encode(turn_id, seq, "turn_end", {"text": text})])


async def test_begin_lock_busy_commit_and_history(store):
    sid, t1, t2 = new_id(), new_id(), new_id()
    started = await store.begin_turn(sid, t1, owner="alice", create=True, message_id=None)
    assert isinstance(started, Started) and started.history == []
    busy = await store.begin_turn(sid, t2, owner="alice", create=False, message_id=None)
    assert isinstance(busy, Busy) and busy.running_turn_id == t1
    assert isinstance(await store.begin_turn(sid, t2, owner="bob", create=False, message_id=None), NotFound)
    await store.flush([LogBatch(sid, t1, [encode(t1, 1, "turn_start", {})], first=True)], [])
    assert await store.finish_turn(sid, t1, commit(t1, "a1", 2))
    again = await store.begin_turn(sid, t2, owner="alice", create=False, message_id=None)
    assert isinstance(again, Started)
    assert [m["role"] for m in again.history] == ["user", "assistant"]
    assert again.meta.usage.total == 20 and again.meta.cost_usd == pytest.approx(0.25)
    assert again.meta.last_input_tokens == 15
    view = await store.get_session(sid, "alice")
    assert view is not None and view.turns == [{"turn_id": t1, "status": "completed"}]
    assert await store.get_session(sid, "bob") is None


async def test_commit_is_fenced_by_the_lock(store):
    sid, t1, t2 = new_id(), new_id(), new_id()
    await store.begin_turn(sid, t1, owner="o", create=True, message_id=None)
    await asyncio.sleep(LOCK_TTL + 0.2)  # the lock expires: someone else may take the session
    assert isinstance(await store.begin_turn(sid, t2, owner="o", create=False, message_id=None), Started)
    assert not await store.finish_turn(sid, t1, commit(t1, "stale", 1)), "a stale worker cannot commit"
    assert (await store.get_session(sid, "o")).history == []


async def test_renewal_keeps_the_lock(store):
    sid, t1 = new_id(), new_id()
    await store.begin_turn(sid, t1, owner="o", create=True, message_id=None)
    for _ in range(4):
        await asyncio.sleep(LOCK_TTL / 2)
        assert await store.renew_lock(sid, t1)
    assert await store.flush([], [(sid, t1), (sid, new_id())]) == [True, False], "batched renewals"
    assert await store.lock_holder(sid) == t1
    assert not await store.renew_lock(sid, new_id())


async def test_idempotent_message_id(store):
    sid, t1, t2 = new_id(), new_id(), new_id()
    await store.begin_turn(sid, t1, owner="o", create=True, message_id="m-1")
    dup = await store.begin_turn(sid, t2, owner="o", create=False, message_id="m-1")
    assert isinstance(dup, Duplicate) and dup.turn_id == t1


async def test_message_id_answers_only_its_owner(store):
    sid, t1, t2, t3 = new_id(), new_id(), new_id(), new_id()
    await store.begin_turn(sid, t1, owner="o", create=True, message_id="m-1")
    for create in (True, False):  # another principal: as if the session did not exist
        other = await store.begin_turn(sid, t2, owner="intruder", create=create, message_id="m-1")
        assert isinstance(other, NotFound)
    assert await store.delete_session(sid, "o")
    # The same id again creates a new session: the deleted one's message ids are gone.
    again = await store.begin_turn(sid, t3, owner="o", create=True, message_id="m-1")
    assert isinstance(again, Started) and again.history == []


async def test_event_log_read_block_and_abandon(store):
    sid, t1 = new_id(), new_id()
    await store.begin_turn(sid, t1, owner="o", create=True, message_id=None)
    reader = asyncio.create_task(store.read_events(sid, t1, 0, 2000))
    await asyncio.sleep(0.05)
    await store.flush([LogBatch(sid, t1, [encode(t1, 1, "turn_start", {})], first=True),
                       LogBatch(sid, t1, [encode(t1, 2, "text_delta", {"text": "x"})])], [])
    got = await asyncio.wait_for(reader, 3)  # a blocked reader wakes on the first new entry
    got += await store.read_events(sid, t1, got[-1].seq, 0)
    assert [e.seq for e in got] == [1, 2] and got[0].id == f"{t1}:1"
    assert not await store.abandon_turn(sid, t1, '"code":"interrupted"'), "still locked: alive"
    await asyncio.sleep(LOCK_TTL + 0.2)
    assert await store.abandon_turn(sid, t1, '"code":"interrupted","message":"m","retryable":true')
    # Several events in one log entry: a reader after seq 1 gets only what follows it. The
    # crash's error sits above any real event: a client the dead worker served further than
    # its log (here, up to seq 7) still gets it, under an id no other event has.
    assert [e.seq for e in await store.read_events(sid, t1, 1, 0)] == [2, ABANDONED_SEQ]
    tail = await store.read_events(sid, t1, 7, 0)
    assert [(e.seq, e.type) for e in tail] == [(ABANDONED_SEQ, "error")] and tail[0].terminal
    assert b'"id":"%s:%d"' % (t1.encode(), ABANDONED_SEQ) in tail[0].data
    assert not await store.abandon_turn(sid, t1, '"code":"interrupted"'), "already terminal"
    state = await store.last_turn(sid, "o")
    assert state == (t1, False) and await store.has_log(sid, t1)


async def test_new_turn_after_a_crash_reports_the_stale_turn(store):
    sid, t1, t2 = new_id(), new_id(), new_id()
    await store.begin_turn(sid, t1, owner="o", create=True, message_id=None)
    await asyncio.sleep(LOCK_TTL + 0.2)
    started = await store.begin_turn(sid, t2, owner="o", create=False, message_id=None)
    assert isinstance(started, Started) and started.stale_turn_id == t1


async def test_waiting_tool_calls_take_one_answer_each_from_the_owner_while_the_turn_holds_the_lock(store):
    sid, t1, t2 = new_id(), new_id(), new_id()
    heard = []
    await store.start(heard.append)
    await store.begin_turn(sid, t1, owner="alice", create=True, message_id=None)
    await store.wait_for_tools(sid, t1, {"toolu_a": "approval", "toolu_c": "client"}, ttl=60)
    assert await store.waiting_tools(sid, "alice") == (t1, {"toolu_a": "approval", "toolu_c": "client"})
    assert await store.waiting_tools(sid, "bob") is None
    assert await store.answer_tool(sid, "bob", "toolu_a", "approval", "{}") == ("not_found", None)
    assert await store.answer_tool(sid, "alice", "toolu_x", "approval", "{}") == ("not_pending", None)
    assert await store.answer_tool(sid, "alice", "toolu_a", "client", "{}") == ("wrong_kind", "approval")
    assert await store.answer_tool(sid, "alice", "toolu_a", "approval", '{"approved":true}') == ("ok", t1)
    assert await store.answer_tool(sid, "alice", "toolu_a", "approval", '{"approved":false}') == ("answered", None)
    assert await store.waiting_tools(sid, "alice") == (t1, {"toolu_c": "client"})
    assert await store.tool_answers(sid, t2, close=False) == {}  # (another turn's: none)
    assert await store.tool_answers(sid, t1, close=False) == {"toolu_a": '{"approved":true}'}
    await store.notify_answered(t1)
    await eventually(lambda: heard == ["!" + t1])
    # Closing the wait takes the answers; later ones are refused.
    assert await store.tool_answers(sid, t1, close=True) == {"toolu_a": '{"approved":true}'}
    assert await store.answer_tool(sid, "alice", "toolu_c", "client", "{}") == ("not_pending", None)
    assert await store.waiting_tools(sid, "alice") == (t1, {})
    # Fenced: once the turn lost its lock, nothing it waited for can be answered.
    await store.wait_for_tools(sid, t1, {"toolu_d": "client"}, ttl=60)
    await asyncio.sleep(LOCK_TTL + 0.1)
    assert await store.answer_tool(sid, "alice", "toolu_d", "client", "{}") == ("not_pending", None)
    assert await store.waiting_tools(sid, "alice") == (None, {})


async def test_delete(store):
    sid, t1 = new_id(), new_id()
    await store.begin_turn(sid, t1, owner="o", create=True, message_id=None)
    await store.finish_turn(sid, t1, commit(t1, "a", 1))
    assert not await store.delete_session(sid, "mallory")
    assert await store.delete_session(sid, "o")
    assert await store.get_session(sid, "o") is None and not await store.has_log(sid, t1)


async def test_redis_channel_shares_one_connection_in_order_and_recovers(redis_url):
    """Concurrent callers on one connection get their own replies; a caller that gives up
    (cancelled) leaves the order intact; a connection killed or silent mid-call fails the
    callers waiting on it, and the next call gets a new one."""
    from redis.exceptions import ResponseError

    from server.store.redis_channel import CommandChannel

    pool = aioredis.ConnectionPool.from_url(redis_url)
    channel = CommandChannel(pool.connection_class, pool.connection_kwargs, timeout=1.0)
    admin = aioredis.Redis.from_url(redis_url)
    key = f"test:{new_id()}"
    try:
        async def incr(n: int) -> list:
            return await channel.execute([_command(b"INCRBY", key.encode(), b"%d" % n), _command(b"GET", key.encode())])

        got = await asyncio.gather(*[incr(1) for _ in range(200)])
        assert sorted(int(r[0]) for r in got) == list(range(1, 201))  # each caller its own replies
        assert all(int(r[1]) >= int(r[0]) for r in got)
        ids = {int((await channel.execute([_command(b"CLIENT", b"ID")]))[0]) for _ in range(3)}
        assert len(ids) == 1  # one connection

        error, ok = (await channel.execute([_command(b"HSET", key.encode(), b"f", b"v"), _command(b"PING")]))
        assert isinstance(error, ResponseError) and ok == b"PONG"  # an error reply is returned, not raised

        blocked = asyncio.create_task(channel.execute([_command(b"BLPOP", f"{key}:l".encode(), b"0.3")]))
        await asyncio.sleep(0.05)
        blocked.cancel()  # its reply still arrives later and is dropped
        assert await channel.execute([_command(b"ECHO", b"after")]) == [b"after"]

        (client_id,) = await channel.execute([_command(b"CLIENT", b"ID")])
        waiting = asyncio.create_task(channel.execute([_command(b"BLPOP", f"{key}:l".encode(), b"5")]))
        await asyncio.sleep(0.1)
        await admin.client_kill_filter(_id=client_id)
        with pytest.raises(RedisError):
            await waiting
        assert await channel.execute([_command(b"ECHO", b"back")]) == [b"back"]

        silent = asyncio.create_task(channel.execute([_command(b"BLPOP", f"{key}:l".encode(), b"5")]))
        with pytest.raises(RedisError, match="did not answer"):  # the 1 s timeout, not the 5 s block
            await asyncio.wait_for(silent, 3)
        assert await channel.execute([_command(b"ECHO", b"fresh")]) == [b"fresh"]
    finally:
        await channel.close()
        await admin.delete(key)
        await admin.aclose()
        await pool.aclose()


async def test_redis_hand_encoded_commands_edge_cases(redis_url):
    """The hand-encoded flush pipeline and scripts: TTL on a first batch, a repeated entry (a
    retried flush) ignored, NOSCRIPT after Redis lost its scripts, and a killed connection."""
    store = RedisStore(redis_url, session_ttl=3600, lock_ttl=30, log_ttl=60, log_maxlen=1000,
                       idempotency_ttl=60)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        sid, t1 = new_id(), new_id()
        await store.begin_turn(sid, t1, owner="o", create=True, message_id=None)
        first = LogBatch(sid, t1, [encode(t1, 1, "turn_start", {}), encode(t1, 2, "text_delta", {"text": "é"})],
                         first=True)
        assert await store.flush([first], [(sid, t1)]) == [True]
        key = f"agent:{{{sid}}}:log:{t1}"
        assert 60 < await admin.ttl(key) <= 3660
        assert await store.flush([first], []) == []  # the same entry again: refused by Redis, ignored
        assert [(e.seq, json.loads(e.data)) for e in await store.read_events(sid, t1, 0, 0)] == [
            (1, {"type": "turn_start", "id": f"{t1}:1"}), (2, {"type": "text_delta", "id": f"{t1}:2", "text": "é"})]

        await admin.expire(key, 5)  # a turn running past its log's first TTL: each renewal extends it
        assert await store.flush([], [(sid, t1)]) == [True] and await admin.ttl(key) > 3600
        await admin.script_flush()
        assert await store.flush([], [(sid, t1), (sid, new_id())]) == [True, False]  # NOSCRIPT: reloaded
        await admin.script_flush()
        other, t2 = new_id(), new_id()
        assert isinstance(await store.begin_turn(other, t2, owner="o", create=True, message_id=None), Started)
        await admin.script_flush()
        assert await store.finish_turn(other, t2, commit(t2, "ünïcode", 1))
        assert [m["content"][0]["text"] for m in (await store.get_session(other, "o")).history] == ["q", "ünïcode"]

        # The shared connection is killed while idle: noticed at once, replaced by the next call.
        (client_id,) = await store._router.channels.shared.execute([_command(b"CLIENT", b"ID")])
        await admin.client_kill_filter(_id=client_id)
        assert await eventually(lambda: store._router.channels.shared._conn is None)
        await store.flush([LogBatch(sid, t1, [encode(t1, 3, "text_delta", {"text": "x"})])], [])
        assert [e.seq for e in await store.read_events(sid, t1, 2, 0)] == [3]
    finally:
        await admin.aclose()
        await store.close()


def test_new_ids_never_start_with_a_dash():
    """A pasted id must not look like a command-line option (1 in 64 random ids would)."""
    ids = [new_id() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == 5000 and all(len(i) == 22 for i in ids)


async def test_cluster_flush_writes_once_per_master(redis_cluster):
    """The event-log flush of turns whose logs live on three masters: one write per master
    (not one per turn), each turn's entry on its own node, the lock renewals likewise."""
    store = RedisStore(redis_cluster.url, cluster=True, session_ttl=3600, lock_ttl=30, log_ttl=60,
                       log_maxlen=1000, idempotency_ttl=60)
    try:
        homes: dict[int, list[str]] = {node.port: [] for node in redis_cluster.masters()}
        while min(map(len, homes.values())) < 4:  # (ids chosen so that each master holds four)
            sid = new_id()
            homes[redis_cluster.master_for_key(f"agent:{{{sid}}}:meta").port].append(sid)
        turns = [(sid, new_id()) for sids in homes.values() for sid in sids[:4]]
        for sid, tid in turns:
            assert isinstance(await store.begin_turn(sid, tid, owner="o", create=True, message_id=None), Started)
        batches = [LogBatch(sid, tid, [encode(tid, 1, "turn_start", {})], first=True) for sid, tid in turns]
        assert await store.flush(batches, turns) == [True] * 12  # (and the renewal script loaded where missing)
        writes = []
        for channel in (channels.shared for channels in store._router._channels.values()):
            channel.execute = (lambda original: lambda commands: writes.append(len(commands)) or original(commands))(
                channel.execute)
        batches = [LogBatch(sid, tid, [encode(tid, 2, "text_delta", {"text": "x"})]) for sid, tid in turns]
        assert await store.flush(batches, turns) == [True] * 12
        assert len(writes) == 3, "one write per master"
        assert sum(writes) == 12 * 3  # per turn: an XADD, a lock renewal and its log's EXPIRE
        for sid, tid in turns:
            assert [e.seq for e in await store.read_events(sid, tid, 0, 0)] == [1, 2]
    finally:
        await store.close()


async def test_wait_for_replicas_holds_no_other_command(redis_url):
    """REDIS_WAIT_REPLICAS against a Redis with no replica: the commit's WAIT times out (the
    commit stands, counted as unreplicated), other sessions' begins are not queued behind it,
    and that node's next commits skip the wait for a while."""
    from server import metrics

    store = RedisStore(redis_url, session_ttl=3600, lock_ttl=30, log_ttl=60, log_maxlen=1000,
                       idempotency_ttl=60, wait_replicas=1)
    try:
        (sid, tid), (other, other_tid) = (new_id(), new_id()), (new_id(), new_id())
        assert isinstance(await store.begin_turn(sid, tid, owner="o", create=True, message_id=None), Started)
        before = metrics.setup().store_unreplicated._value.get()
        waiting = asyncio.create_task(store.finish_turn(sid, tid, commit(tid, "kept", 1)))
        await asyncio.sleep(0.05)
        began = await store.begin_turn(other, other_tid, owner="o", create=True, message_id=None)
        assert isinstance(began, Started) and not waiting.done(), "the begin did not queue behind the WAIT"
        assert await waiting is True
        assert metrics.setup().store_unreplicated._value.get() == before + 1
        assert await asyncio.wait_for(store.finish_turn(other, other_tid, commit(other_tid, "quick", 1)), 0.5)
        assert [m["content"][0]["text"] for m in (await store.get_session(sid, "o")).history] == ["q", "kept"]
    finally:
        await store.close()


# -- the sessions index (GET /sessions) ------------------------------------------------------
def owned_commit(turn_id: str, text: str, seq: int, owner: str) -> TurnCommit:
    c = commit(turn_id, text, seq)
    c.owner, c.preview = owner, text
    return c


async def new_session(store, owner: str, title: str, text: str) -> str:
    """A session with one finished turn (its title from the first message, `text` its answer)."""
    sid, tid = new_id(), new_id()
    assert isinstance(await store.begin_turn(sid, tid, owner=owner, create=True, message_id=None, title=title), Started)
    assert await store.finish_turn(sid, tid, owned_commit(tid, text, 1, owner))
    await asyncio.sleep(0.003)  # (a later millisecond: the order below is by activity)
    return sid


async def listed(store, owner: str, limit: int = 100, after=None) -> list[str]:
    return [sid for sid, _meta in (await store.list_sessions(owner, limit, after)).sessions]


async def test_sessions_index_newest_first_pages_and_owners(store):
    alice, bob = f"key:alice}}{{{new_id()}", f"key:bob{new_id()}"  # (any characters: the key holds a digest)
    sids = [await new_session(store, alice, f"title {n}", f"answer {n}") for n in range(5)]
    theirs = await new_session(store, bob, "bob's", "b")
    assert await listed(store, alice) == sids[::-1]
    assert await listed(store, bob) == [theirs] and await listed(store, f"key:nobody{new_id()}") == []
    page = await store.list_sessions(alice, 2, None)
    sid, meta = page.sessions[0]
    assert (sid, meta.title, meta.title_source, meta.preview, meta.turns) == (
        sids[4], "title 4", "message", "answer 4", 1)
    assert meta.updated_ms >= int(meta.created_at * 1000) and meta.usage.total == 20
    assert page.next == (page.sessions[1][1].updated_ms, sids[3])
    # A turn lands on a session already listed (it moves up) and a new session starts: the next
    # pages go on after the cursor, with neither repeated nor skipped.
    tid = new_id()
    await store.begin_turn(sids[4], tid, owner=alice, create=False, message_id=None)
    assert await store.finish_turn(sids[4], tid, owned_commit(tid, "again", 2, alice))
    await asyncio.sleep(0.003)  # (the new session's activity a later millisecond: ties go by id)
    newest = await new_session(store, alice, "newest", "n")
    second = await store.list_sessions(alice, 2, page.next)
    assert [s for s, _ in second.sessions] == [sids[2], sids[1]] and second.next is not None
    last = await store.list_sessions(alice, 2, second.next)
    assert [s for s, _ in last.sessions] == [sids[0]] and last.next is None
    assert await listed(store, alice) == [newest, sids[4], sids[3], sids[2], sids[1], sids[0]]
    assert (await store.list_sessions(alice, 1, None)).sessions[0][1].preview == "n"


async def test_sessions_index_rename_model_title_and_delete(store):
    o = f"o-{new_id()}"  # (a shared Redis keeps other runs' sessions)
    sid = await new_session(store, o, "first words", "a")
    renamed = await store.rename_session(sid, o, "My trip")
    assert (renamed.title, renamed.title_source) == ("My trip", "user")
    assert await store.rename_session(sid, "mallory", "x") is None
    assert await store.rename_session(new_id(), o, "x") is None
    # The title model never replaces the owner's title, but its usage counts.
    assert await store.add_model_title(sid, o, "Model title", Usage(100, 7), 0.5)
    meta = (await store.get_session(sid, o)).meta
    assert (meta.title, meta.title_source, meta.usage.total, meta.cost_usd) == (
        "My trip", "user", 127, pytest.approx(0.75))
    other = await new_session(store, o, "question", "a")
    assert await store.add_model_title(other, o, "Better title", Usage(10, 2), 0.01)
    meta = (await store.get_session(other, o)).meta
    assert (meta.title, meta.title_source, meta.usage.input_tokens) == ("Better title", "model", 20)
    ghost = new_id()
    assert not await store.add_model_title(ghost, o, "t", Usage(1, 1), 0.1), "no session: nothing written"
    assert not await store.add_model_title(other, "mallory", "t", Usage(1, 1), 0.1)
    assert await store.get_session(ghost, o) is None
    assert await listed(store, o) == [other, sid]
    assert await store.delete_session(sid, o)
    assert await listed(store, o) == [other]


@pytest.mark.parametrize("backend", ["memory", "redis", "cluster"])
async def test_sessions_index_forgets_expired_sessions(request, redis_url, backend):
    """An expired session is not listed, and the listing drops it from the index; the index key
    itself expires with the sessions (its TTL renewed by each update)."""
    kw = dict(session_ttl=2, lock_ttl=LOCK_TTL, log_ttl=60, log_maxlen=1000, idempotency_ttl=60)
    url = request.getfixturevalue("redis_cluster").url if backend == "cluster" else redis_url
    store = MemoryStore(**kw) if backend == "memory" else RedisStore(url, cluster=backend == "cluster", **kw)
    try:
        owner = f"expiring-{new_id()}"
        index = f"agent:sessions:{{{principal_tag(owner)}}}"
        await new_session(store, owner, "old", "a")
        if backend != "memory":
            assert 0 < await store.redis.pttl(index) <= 2000
        await asyncio.sleep(1.2)
        young = await new_session(store, owner, "young", "b")  # (the index outlives the old session)
        await asyncio.sleep(1.2)
        assert await listed(store, owner) == [young]
        if backend != "memory":
            assert await store.redis.zrange(index, 0, -1) == [young.encode()], "the expired entry was dropped"
        else:
            assert list(store._index[owner]) == [young]
    finally:
        await store.close()


async def test_redis_index_pages_through_equal_times_and_dead_entries(redis_url):
    """Sessions whose activity has the same millisecond page in id order (descending), one per
    page, without repeats; index entries whose session is gone are skipped and dropped, and
    the page filled from further down. A new session's first turn adds it at once."""
    store = RedisStore(redis_url, session_ttl=3600, lock_ttl=30, log_ttl=60, log_maxlen=1000, idempotency_ttl=60)
    try:
        owner = f"ties-{new_id()}"
        index = f"agent:sessions:{{{principal_tag(owner)}}}"
        sids = [await new_session(store, owner, f"t{n}", "a") for n in range(5)]
        await store.redis.zadd(index, {sid: 1_700_000_000_000 for sid in sids[:4]})  # four at the same ms
        seen, after = [], None
        while True:
            page = await store.list_sessions(owner, 1, after)
            seen += [sid for sid, _ in page.sessions]
            if page.next is None:
                break
            after = page.next
        assert seen == [sids[4], *sorted(sids[:4], reverse=True)]
        await store.redis.delete(*[f"agent:{{{sid}}}:meta" for sid in sorted(sids[:4], reverse=True)[:2]])
        page = await store.list_sessions(owner, 2, None)
        assert [sid for sid, _ in page.sessions] == [sids[4], sorted(sids[:4], reverse=True)[2]]
        assert await store.redis.zcard(index) == 3
        sid, tid = new_id(), new_id()
        await store.begin_turn(sid, tid, owner=owner, create=True, message_id=None, title="running")
        first, meta = (await store.list_sessions(owner, 1, None)).sessions[0]
        assert (first, meta.title, meta.turns, meta.active_turn_id) == (sid, "running", 0, tid)
    finally:
        await store.close()
