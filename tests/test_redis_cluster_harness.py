"""The local Redis Cluster harness (tests/redis_cluster.py) does what the cluster tests rely on:
keys spread over every master, failover after SIGKILL keeps WAITed writes, a killed node
rejoins as a replica, a dead shard leaves the others serving, and no process or directory
outlives the cluster."""

from __future__ import annotations

import itertools
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import redis

from .redis_cluster import RedisCluster


@pytest.fixture
def base_dir() -> Path:
    """A path that does not exist yet, so the cluster creates it and removes it on stop."""
    return Path(tempfile.gettempdir()) / f"clusterharness-{uuid.uuid4().hex[:8]}"


def keys_on_every_master(cluster: RedisCluster) -> dict[int, str]:
    """One key per master port, found by asking the cluster who serves each candidate."""
    found: dict[int, str] = {}
    masters = len(cluster.masters())
    for i in itertools.count():
        key = f"agent:{{s{i}}}:meta"
        found.setdefault(cluster.master_for_key(key).port, key)
        if len(found) == masters:
            return found
    raise AssertionError("unreachable")


def test_three_masters_serve_keys_on_every_master(base_dir: Path) -> None:
    with RedisCluster(masters=3, base_dir=str(base_dir)) as cluster:  # (__enter__ starts it)
        assert [n.role for n in cluster.nodes] == ["master"] * 3 and cluster.replicas() == []
        assert cluster.url == f"redis://127.0.0.1:{cluster.nodes[0].port}/0"
        assert all(n.port < 55535 for n in cluster.nodes)
        keys = keys_on_every_master(cluster)
        assert len(keys) == 3

        client = redis.RedisCluster.from_url(cluster.url)
        try:
            for port, key in keys.items():
                client.set(key, f"on {port}")
            for port, key in keys.items():
                assert client.get(key) == f"on {port}".encode()
                node = next(n for n in cluster.nodes if n.port == port)
                assert node.client().get(key) == f"on {port}"  # really stored on that master
            cluster.flushall()
            assert [client.get(key) for key in keys.values()] == [None, None, None]
        finally:
            client.close()
        pids = [n.pid for n in cluster.nodes]
        assert all((n.dir / "nodes.conf").exists() and (n.dir / "redis.log").exists() for n in cluster.nodes)
    assert not base_dir.exists()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_failover_after_sigkill_keeps_waited_writes_and_the_old_master_rejoins(base_dir: Path) -> None:
    with RedisCluster(masters=3, replicas_per_master=1, base_dir=str(base_dir)).start() as cluster:
        assert len(cluster.masters()) == 3 and len(cluster.replicas()) == 3
        key = "agent:{failover}:meta"
        client = redis.RedisCluster.from_url(cluster.url)
        try:
            client.set(key, "before")
            old = cluster.master_for_key(key)
            assert old.client().execute_command("WAIT", 1, 2000) == 1  # the replica has it
            replica_ports = {r[1] for r in old.client().execute_command("ROLE")[2]}
            assert len(replica_ports) == 1

            old.kill()
            assert old.role == "down"
            cluster.wait_healthy(timeout=15)
            new = cluster.master_for_key(key)
            assert new.port in {int(p) for p in replica_ports} and new.role == "master"
            assert client.get(key) == b"before"
            assert cluster.url != f"redis://127.0.0.1:{old.port}/0"  # new clients start from a live node

            old.restart()
            cluster.wait_healthy(timeout=15)
            assert old.role == "replica"
            assert old.client().execute_command("ROLE")[2] == new.port  # ['slave', host, port, ...]
            assert cluster.master_for_key(key) is new
            assert len(cluster.masters()) == 3 and len(cluster.replicas()) == 3
        finally:
            client.close()


def test_a_dead_master_without_replica_takes_down_only_its_slots(base_dir: Path) -> None:
    """cluster-require-full-coverage no: the other shards keep serving; with appendonly the
    restarted master still has its writes; wait_healthy does not call a hole in the map healthy."""
    with RedisCluster(masters=3, appendonly=True, base_dir=str(base_dir)).start() as cluster:
        keys = keys_on_every_master(cluster)
        (dead_port, dead_key), (other_port, other_key) = list(keys.items())[:2]
        dead = next(n for n in cluster.nodes if n.port == dead_port)
        other = next(n for n in cluster.nodes if n.port == other_port)
        dead.client().set(dead_key, "durable")

        dead.kill()
        deadline = time.monotonic() + 10
        while int(other.cluster_info()["cluster_slots_fail"]) == 0:  # until the others mark it FAIL
            assert time.monotonic() < deadline, "the dead master was never marked FAIL"
            time.sleep(0.02)
        assert other.cluster_info()["cluster_state"] == "ok"
        with pytest.raises(TimeoutError, match="not a live master"):
            cluster.wait_healthy(timeout=0.2)
        assert other.client().set(other_key, "still served")

        dead.restart()
        cluster.wait_healthy(timeout=15)
        assert dead.role == "master" and cluster.master_for_key(dead_key) is dead
        assert dead.client().get(dead_key) == "durable"
