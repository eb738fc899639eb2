"""A real Redis Cluster of local `redis-server` processes on loopback, for tests.

Only redis-py and subprocess: no redis-cli, no Docker. Each node is a `redis-server` child
process in its own session (so a test can SIGKILL one without touching the others) with its
own directory (nodes.conf, log, AOF) under `base_dir`. `start()` does what `redis-cli
--cluster create` does: distinct config epochs, ADDSLOTSRANGE in even ranges, MEET,
REPLICATE, then polls until every node agrees on the whole map.

    with RedisCluster(masters=3, replicas_per_master=1).start() as cluster:
        client = redis.RedisCluster.from_url(cluster.url)
        cluster.master_for_key("agent:{sid}:meta").kill()
        cluster.wait_healthy()   # the replica has taken over

Nodes live in their own sessions, so they outlive a test process that is SIGKILLed;
`stop()` (also `__exit__`, and atexit at a normal interpreter exit) SIGKILLs them and
removes their directories.

Ports: a node's cluster bus listens on port+10000, so both must be free. Ports are drawn
below the kernel's ephemeral range (for both numbers), so no outgoing connection can take
a killed node's port before it restarts; a port that turns out taken anyway (another test
run picked it first) is swapped for a new one at start.

Configuration, and why:
- `cluster-require-full-coverage no`: when a master dies, only its own slots stop being
  served; the rest of the cluster keeps `cluster_state:ok` and serves the other shards.
  With `yes` one dead master takes every session down until failover (and forever in a
  cluster without replicas), so a test could not tell "this shard is gone" from "Redis
  is gone". The cost is that `cluster_state:ok` no longer proves coverage, which is why
  `wait_healthy` also checks that every slot has a live master.
- `cluster-allow-reads-when-down no` (the default): a node that thinks the cluster is
  down refuses reads too, so a test never reads stale data from a minority side.
- Failover after SIGKILL of a master: peers mark it PFAIL after `cluster-node-timeout`
  (1000 ms here) without a pong, FAIL once a majority of masters agree (gossip, ~100 ms),
  then its replica waits 500 ms + random(0-500 ms) + 1000 ms per rank behind better
  replicas and asks the masters for votes. So a failover takes ~2-3 s, and it needs a
  majority of the slot-owning masters alive (they vote): with `masters` < 3 it never happens.
- `cluster-replica-validity-factor 0`: a replica is always eligible, however long ago it
  last heard from its master; with the default 10 a replica whose link was broken for a
  while (e.g. it was re-syncing) would refuse to take over and the shard stays down.
- `repl-diskless-sync-delay 0`: the default waits 5 s for more replicas before a full sync,
  which would put 5 s into `start()` and into every rejoin of a killed node.
- `repl-ping-replica-period 1` (default 10): CLUSTER SLOTS leaves out a replica whose
  replication offset is still 0, and on a master nobody has written to the offset only
  moves when the master pings its replicas. With the default a fresh 3+3 cluster (or a
  node rejoining an idle shard) looks replica-less to clients for up to 10 s.
- `cluster-allow-replica-migration no`: a replica never moves to another master on its
  own, so the topology changes only when a test kills something. A master that lost all
  its slots to its former replica still turns into that node's replica (Redis does this
  when the new owner took exactly its slots), which is what `restart()` relies on.
- `replica-serve-stale-data yes` (the default): a replica whose link is down still answers
  READONLY reads; clients here read from masters, so it only matters to tests that opt in.
- `--save ''` and, unless `appendonly=True`, no AOF: a killed master restarts empty and
  rejoins as a replica with a full sync from the new master. With `appendonly=True`
  (`appendfsync always`) a master without replicas keeps its acknowledged writes across
  SIGKILL + restart.
- Redis holds a restarted or new master in `cluster_state:fail` for 2 s after the process
  starts (CLUSTER_WRITABLE_DELAY, so a rebooted master gets a chance to learn it was
  replaced), so no cluster is ready in less than ~2 s.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Literal

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
SLOTS = 16384
BUS_OFFSET = 10000  # the cluster bus port is always port + 10000 (cluster-port left unset)
POLL = 0.02

# One node's slot map as CLUSTER SLOTS reports it: (first, last, master port, replica ports).
SlotMap = list[tuple[int, int, int, tuple[int, ...]]]


class PortTaken(RuntimeError):
    """redis-server could not bind: someone took the port between our check and its bind."""


def free_port(claimed: set[int]) -> int:
    """A port p such that p and p+10000 are both bindable now and both below the ephemeral range."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = 10000, min(ephemeral_low, 65536) - BUS_OFFSET
    if high - low < 1000:  # an unusual ephemeral range: take any pair that is free now
        low, high = 1024, 65536 - BUS_OFFSET
    for _ in range(1000):
        port = random.randrange(low, high)
        if {port, port + BUS_OFFSET} & claimed or 6379 in (port, port + BUS_OFFSET):
            continue
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            claimed.update((port, port + BUS_OFFSET))
            return port
    raise RuntimeError(f"no free port pair in {low}-{high}")


def _bindable(port: int) -> bool:
    # SO_REUSEADDR as redis-server sets it, so a port in TIME_WAIT counts as free.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Node:
    """One redis-server process; its directory survives kill() so restart() rejoins with the same identity."""

    def __init__(self, port: int, dir: Path, args: list[str]):
        self.port = port
        self.dir = dir
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.node_id = ""
        # No retries: a poll loop wants the failure now, not after redis-py's backoff.
        self._client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2,
                                   socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))

    def __repr__(self) -> str:
        return f"<Node 127.0.0.1:{self.port} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        """The process is running (it may still be stopped with SIGSTOP)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def role(self) -> Literal["master", "replica", "down"]:
        """What the node says it is right now (ROLE), or "down" if it does not answer."""
        if not self.alive:
            return "down"
        try:
            kind = self._client.execute_command("ROLE")[0]
        except redis.RedisError:
            return "down"
        return "master" if kind == "master" else "replica"

    def client(self) -> redis.Redis:
        """A plain (non-cluster) client for this node only, decode_responses=True, no retries."""
        return self._client

    def spawn(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([REDIS_SERVER, *self.args], cwd=self.dir, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, deadline: float) -> None:
        """Until it answers PING; raises PortTaken if it died because it could not bind."""
        while True:
            if not self.alive:
                log = self.log()
                if "Address already in use" in log:
                    raise PortTaken(f"{self}: port taken")
                raise RuntimeError(f"{self} exited with {self.proc.returncode if self.proc else None}:\n{log}")
            try:
                if self._client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self} did not answer PING:\n{self.log()}")
            time.sleep(POLL / 2)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the node's process group (it forks for diskless syncs and AOF rewrites).
        For a fatal signal, wait until it is gone, so the port is free and its peers see it drop."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.proc.wait(30)
        self._client.connection_pool.disconnect()

    def restart(self, timeout: float = 30.0) -> None:
        """Start the same process again (same port, dir and nodes.conf: it rejoins as the same node).
        A node still running is SIGKILLed first. Returns once it answers PING; it has not rejoined yet."""
        if self.alive:
            self.kill()
        self._client.connection_pool.disconnect()
        self.spawn()
        self.wait_ready(time.monotonic() + timeout)

    def stop(self) -> None:
        self.kill(signal.SIGKILL)
        self._client.close()

    def log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def cluster_info(self) -> dict[str, str]:
        text = self._client.execute_command("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def slot_map(self) -> SlotMap:
        """This node's view of who serves which slots (CLUSTER SLOTS lists only replicas it thinks are up)."""
        return sorted((int(s[0]), int(s[1]), int(s[2][1]), tuple(sorted(int(r[1]) for r in s[3:])))
                      for s in self._client.execute_command("CLUSTER", "SLOTS"))


class RedisCluster:
    """masters + masters*replicas_per_master local nodes; nodes[:masters] start as the masters."""

    def __init__(self, masters: int = 3, replicas_per_master: int = 0, node_timeout_ms: int = 1000,
                 base_dir: str | None = None, appendonly: bool = False):
        if masters < 1 or replicas_per_master < 0:
            raise ValueError("need at least one master and no negative replica count")
        self.n_masters = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self.base_dir = Path(base_dir) if base_dir else None
        self.dir: Path | None = None
        self._own_dir = False  # remove self.dir itself on stop (we created it)
        self.nodes: list[Node] = []

    @property
    def url(self) -> str:
        """The first master's URL; if that node is down, the first live node's (any node will do)."""
        node = next((n for n in self.nodes if n.alive), self.nodes[0] if self.nodes else None)
        if node is None:
            raise RuntimeError("cluster not started")
        return f"redis://127.0.0.1:{node.port}/0"

    def start(self, timeout: float = 30.0) -> "RedisCluster":
        """Processes up, slots assigned, nodes met, replicas attached; returns when every node
        reports cluster_state:ok and the same full map, with every replica synced and listed."""
        if not os.path.exists(REDIS_SERVER):
            raise FileNotFoundError(f"redis-server not found ({REDIS_SERVER})")
        deadline = time.monotonic() + timeout
        if self.base_dir is None:
            self.dir, self._own_dir = Path(tempfile.mkdtemp(prefix="redis-cluster-")), True
        else:
            self._own_dir = not self.base_dir.exists()
            self.dir = self.base_dir
            self.dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            self._spawn(deadline)
            self._form(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> "RedisCluster":
        return self if self.nodes else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _new_node(self, claimed: set[int]) -> Node:
        assert self.dir is not None
        port = free_port(claimed)
        node_dir = self.dir / f"node-{port}"
        shutil.rmtree(node_dir, ignore_errors=True)  # a stale nodes.conf would make it someone else
        args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir), "--daemonize", "no",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-require-full-coverage", "no", "--cluster-allow-reads-when-down", "no",
                "--cluster-replica-validity-factor", "0", "--cluster-allow-replica-migration", "no",
                "--replica-serve-stale-data", "yes", "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        return Node(port, node_dir, args)

    def _spawn(self, deadline: float) -> None:
        """All processes at once, then wait for each; a node that lost its port race gets a new one."""
        claimed: set[int] = set()
        self.nodes = [self._new_node(claimed) for _ in range(self.n_masters * (1 + self.replicas_per_master))]
        for node in self.nodes:
            node.spawn()
        for i in range(len(self.nodes)):
            for attempt in range(5):
                try:
                    self.nodes[i].wait_ready(deadline)
                    break
                except PortTaken:
                    if attempt == 4:
                        raise
                    shutil.rmtree(self.nodes[i].dir, ignore_errors=True)
                    self.nodes[i] = self._new_node(claimed)
                    self.nodes[i].spawn()

    def _form(self, deadline: float) -> None:
        masters = self.nodes[:self.n_masters]
        for epoch, node in enumerate(self.nodes, 1):
            node.node_id = node.client().execute_command("CLUSTER", "MYID")
            # Distinct epochs up front, as redis-cli does: no epoch-collision rounds before it settles.
            node.client().execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        ranges = [(i * SLOTS // len(masters), (i + 1) * SLOTS // len(masters) - 1) for i in range(len(masters))]
        for node, (first, last) in zip(masters, ranges):
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for node in self.nodes[1:]:
            self.nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        self._wait(deadline, self._unknown_nodes, "nodes to meet")
        replicas_of: dict[int, list[Node]] = {m.port: [] for m in masters}
        for i, replica in enumerate(self.nodes[self.n_masters:]):
            master = masters[i // self.replicas_per_master]
            replica.client().execute_command("CLUSTER", "REPLICATE", master.node_id)
            replicas_of[master.port].append(replica)
        expected = [(first, last, m.port, tuple(sorted(r.port for r in replicas_of[m.port])))
                    for m, (first, last) in zip(masters, ranges)]
        self._wait(deadline, lambda: self._problem(expected), "cluster to form")

    def _unknown_nodes(self) -> str | None:
        for node in self.nodes:
            known = int(node.cluster_info()["cluster_known_nodes"])
            if known != len(self.nodes):
                return f"{node} knows {known} of {len(self.nodes)} nodes"
        return None

    def _wait(self, deadline: float, problem: Callable[[], str | None], what: str) -> None:
        """Poll `problem()` (a description of what is still wrong, or None) until None or the deadline."""
        while True:
            try:
                found = problem()
            except redis.RedisError as exc:
                found = repr(exc)
            if found is None:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n} ({n.role})\n{n.log(15)}" for n in self.nodes)
                raise TimeoutError(f"timed out waiting for {what}: {found}\n{logs}")
            time.sleep(POLL)

    def _problem(self, expected: SlotMap | None = None) -> str | None:
        """What keeps the cluster from being healthy, or None: every live node must be in
        cluster_state:ok and have the same slot map (= `expected` if given), which covers every
        slot with a live master and lists exactly the live replicas, each with its link up."""
        live = {n.port: n for n in self.nodes if n.alive}
        maps: dict[int, SlotMap] = {}
        replicas: set[int] = set()
        for node in live.values():
            state = node.cluster_info()["cluster_state"]
            if state != "ok":
                return f"{node} cluster_state:{state}"
            if node.role == "replica":
                replicas.add(node.port)
                link = node.client().info("replication").get("master_link_status")
                if link != "up":
                    return f"{node} replica link {link}"
            maps[node.port] = node.slot_map()
        if not maps:
            return "no live nodes"
        reference = next(iter(maps.values()))
        for port, slot_map in maps.items():
            if slot_map != reference:
                return f"nodes disagree: {port} sees {slot_map}, another sees {reference}"
        if expected is not None and reference != expected:
            return f"slot map {reference}, want {expected}"
        covered = 0
        for first, last, master, listed in reference:
            if first != covered:
                return f"slots {covered}-{first - 1} have no master"
            covered = last + 1
            if master not in live or live[master].role != "master":
                return f"slots {first}-{last} belong to {master}, not a live master"
            if any(port not in live for port in listed):
                return f"slots {first}-{last} list a dead replica in {listed}"
        if covered != SLOTS:
            return f"slots {covered}-{SLOTS - 1} have no master"
        unlisted = replicas - {port for *_, listed in reference for port in listed}
        if unlisted:
            return f"replicas {sorted(unlisted)} are not in the slot map yet"
        return None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and agrees on a slot map in which every slot
        has a live master and every live replica is synced and listed: after a failover, or after
        a restarted node has rejoined. Raises TimeoutError (what is still wrong, node logs)."""
        self._wait(time.monotonic() + timeout, self._problem, "a healthy cluster")

    def masters(self) -> list[Node]:
        """Nodes that say they are masters now (a restarted ex-master counts until it turns replica)."""
        return [n for n in self.nodes if n.role == "master"]

    def replicas(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "replica"]

    def master_for_key(self, key: str | bytes) -> Node:
        """The master serving the key's slot now, as most live nodes see it (CLUSTER SLOTS)."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        votes: Counter[int] = Counter()
        for node in self.nodes:
            if not node.alive:
                continue
            try:
                slot_map = node.slot_map()
            except redis.RedisError:
                continue
            votes.update(master for first, last, master, _ in slot_map if first <= slot <= last)
        if not votes:
            raise LookupError(f"no live node knows who serves slot {slot}")
        port = votes.most_common(1)[0][0]
        return next(n for n in self.nodes if n.port == port)

    def flushall(self) -> None:
        """FLUSHALL on every master (replicas follow through replication)."""
        for node in self.masters():
            node.client().flushall()

    def stop(self) -> None:
        """SIGKILL every node and remove their directories (and base_dir, if this created it)."""
        atexit.unregister(self.stop)
        for node in self.nodes:
            node.stop()
        if self.dir is not None:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                for node in self.nodes:
                    shutil.rmtree(node.dir, ignore_errors=True)
