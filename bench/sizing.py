"""Section 8: what one Redis node carries (the README's "Sizing Redis").

Against a redis-server of its own (fresh, on a free port, no persistence: no other client's
data or commands in its counters), our server (1 worker, as the bench runs it) and the bench's
fake upstream, this measures:

- Redis CPU per short turn: INFO cpu (used_cpu_sys + used_cpu_user, the whole process) over a
  load of short turns, minus Redis' idle rate, / turns; the commands per turn from INFO
  commandstats (incl. those run inside Lua). Once with the bench's server env (no keys: no
  rate limits) and once with a key and the limits on (RPM/TPM/stream caps set high enough that
  nothing is refused), as an exposed deployment runs. 1 / that = turns per second one Redis
  core carries.
- The event log: N streams held open at the bench's token rate; over a steady window (every
  stream running, none starting or ending) the XADDs per second (one per running turn per
  EVENT_LOG_FLUSH_MS pass that has news for it) and the Redis CPU per XADD and per
  stream-second: 1 / that = concurrent streams one Redis core carries.
- Memory: INFO used_memory (minus client buffers) before and after sessions of 1 and of 10
  short turns on an emptied Redis, then again once the turns' event logs are deleted: the
  session's own keys apart from the logs that expire EVENT_LOG_TTL_SECONDS after each turn.
  MEMORY USAGE (exact, SAMPLES 0) of every key, by kind. And the event log's growth per
  stream-minute over the streams' window.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import redis as redislib

from .procs import LoadGen, Redis, Server

KEY = "sizing-bench-key-0123456789abcdef"  # the one client key of the "limits on" server
LIMITS_ENV = {"AGENT_API_KEYS": KEY, "RATE_LIMIT_RPM": "10000000", "RATE_LIMIT_TPM": str(10**12),
              "MAX_CONCURRENT_STREAMS_PER_PRINCIPAL": "100000"}
KINDS = ("meta", "msgs", "turns", "mids", "lock", "log")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] sizing: {msg}", file=sys.stderr, flush=True)


def directive(**kw: Any) -> str:
    return "#fake" + json.dumps(kw, separators=(",", ":"))


def kind_of(key: bytes) -> str:
    name = key.decode(errors="replace")
    if name.startswith("agent:{"):
        tail = name.rsplit("}:", 1)[-1]
        return "log" if tail.startswith("log:") else tail
    if name.startswith("agent:rl:"):
        return "rl:" + name.rsplit(":", 1)[-1]
    return "other"


class Probe:
    """INFO counters of the private Redis, read over one connection (our INFO calls are left
    out of the command counts)."""

    def __init__(self, port: int):
        self.r = redislib.Redis(host="127.0.0.1", port=port)

    def snap(self) -> dict[str, Any]:
        cpu, mem = self.r.info("cpu"), self.r.info("memory")
        stats = self.r.info("commandstats")
        cmds = {k[8:]: (int(v["calls"]), int(v["usec"])) for k, v in stats.items() if k.startswith("cmdstat_")}
        return {"t": time.monotonic(), "cpu": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                "mem": int(mem["used_memory"]) - int(mem.get("mem_clients_normal", 0)), "cmds": cmds}

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        """Counters from a to b; commands as {name: calls} and {name: µs inside it} (a script's µs
        include those of the commands it ran, which are also counted under their own names)."""
        calls = {k: v[0] - a["cmds"].get(k, (0, 0))[0] for k, v in b["cmds"].items()}
        usec = {k: v[1] - a["cmds"].get(k, (0, 0))[1] for k, v in b["cmds"].items()}
        calls = {k: n for k, n in calls.items() if n and k not in ("info", "ping")}  # (ours)
        return {"secs": b["t"] - a["t"], "cpu": b["cpu"] - a["cpu"], "mem": b["mem"] - a["mem"],
                "calls": calls, "usec": {k: usec[k] for k in calls}}

    def round_trip_cpu(self, n: int = 1000) -> float:
        """Redis CPU (µs) of one GET round trip, one client, nothing pipelined: the box's yardstick
        (most of a turn's Redis CPU is per round trip: reading, parsing, writing, epoll)."""
        s0 = self.snap()
        for _ in range(n):
            self.r.get("agent:sizing:nothing")
        d = self.delta(s0, self.snap())
        return d["cpu"] / n * 1e6

    def keys_by_kind(self) -> dict[str, dict[str, float]]:
        """Every key's MEMORY USAGE (exact), summed by kind, with counts."""
        keys = list(self.r.scan_iter(count=1000))
        out: dict[str, dict[str, float]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            pipe = self.r.pipeline(transaction=False)
            for k in chunk:
                pipe.memory_usage(k, samples=0)
            for k, used in zip(chunk, pipe.execute()):
                d = out.setdefault(kind_of(k), {"n": 0, "bytes": 0})
                d["n"] += 1
                d["bytes"] += used or 0
        return out

    def delete_logs(self) -> int:
        logs = list(self.r.scan_iter(match="agent:{*}:log:*", count=1000))
        for i in range(0, len(logs), 500):
            self.r.delete(*logs[i:i + 500])
        return len(logs)

    def log_bytes_per_event(self) -> tuple[float, int, int]:
        """(MEMORY USAGE of the turns' logs / events in them, logs, entries): a log's last entry
        id is 0-<last seq>."""
        logs = list(self.r.scan_iter(match="agent:{*}:log:*", count=1000))
        pipe = self.r.pipeline(transaction=False)
        for k in logs:
            pipe.memory_usage(k, samples=0)
            pipe.xrevrange(k, count=1)
            pipe.xlen(k)
        res = pipe.execute()
        used = sum(res[0::3])
        events = sum(int(top[0][0].split(b"-")[1]) for top in res[1::3] if top)
        return (used / events if events else 0.0), len(logs), sum(res[2::3])

    def flush(self) -> None:
        self.r.flushall()
        time.sleep(0.2)


class Sizing:
    def __init__(self, bench: Any):
        self.b = bench
        self.a = bench.a
        q = self.a.quick
        self.pace = self.a.pace_ms
        self.streams = 100 if q else 200
        self.window = 3.0 if q else 5.0
        self.turn_clients, self.turn_rounds, self.session_turns = 50, (10 if q else 20), 10
        self.new_sessions = 250 if q else 500
        self.results: dict[str, Any] = {}
        self._last_mem = 0  # used_memory delta of the last `_turns`

    def run(self) -> dict[str, Any]:
        redis = Redis()  # fresh and private, whatever --redis-url says
        probe = Probe(redis.port)
        self.results["redis_version"] = probe.r.info("server")["redis_version"]
        try:
            self._plain(redis, probe)
            self._limits(redis, probe)
        finally:
            probe.r.close()
            redis.stop()
        return self.results

    # -- helpers ------------------------------------------------------------------------------
    def _wait_quiet(self, what: str) -> None:
        """The bench's wait for an idle box, at most 8 s here: this section reads Redis CPU per
        operation, which a busy box disturbs less than it does latencies."""
        saved = self.a.quiet_wait
        self.a.quiet_wait = min(saved, 8.0)
        try:
            self.b.wait_quiet(what)
        finally:
            self.a.quiet_wait = saved

    def _server(self, redis: Redis, tag: str, extra: dict[str, str] | None = None) -> Server:
        return Server("ours", self.b.fake, redis.url, workers=1, extra_env=extra, tag=f"-sizing{tag}")

    @staticmethod
    def _run(lg: LoadGen, server: Server, spec: dict[str, Any], clients: int, rounds: int) -> dict[str, Any]:
        out = lg.call({"cmd": "run", "host": "127.0.0.1", "port": server.port, "clients": clients,
                       "rounds": rounds, "timeout": 60, **spec})
        out["ok"] = sum(1 for r in out["records"] if not r[6])
        del out["records"]
        return out

    def _warm(self, lg: LoadGen, server: Server, headers: dict[str, str]) -> None:
        self._run(lg, server, {"path": "/agent", "headers": headers, "body": {"message": directive(tokens=5)},
                               "session_every": 2}, 10, 4)
        self._run(lg, server, {"path": "/agent/stream", "headers": {"Accept": "text/event-stream", **headers},
                               "body": {"message": directive(tokens=10, pace_ms=5)}}, 10, 2)
        time.sleep(0.3)

    def _idle_rate(self, probe: Probe) -> float:
        """Redis CPU per second with the server connected and idle (its cron, our INFO calls)."""
        s0 = probe.snap()
        time.sleep(1.0)
        d = probe.delta(s0, probe.snap())
        return max(d["cpu"], 0.0) / d["secs"]

    def _turns(self, lg: LoadGen, server: Server, probe: Probe, headers: dict[str, str], idle: float,
               clients: int, rounds: int, every: int, body: dict[str, Any]) -> dict[str, Any]:
        probe.flush()
        s0 = probe.snap()
        out = self._run(lg, server, {"path": "/agent", "headers": headers, "body": body, "session_every": every},
                        clients, rounds)
        time.sleep(0.3)  # the last commits' replies
        s1 = probe.snap()
        d = probe.delta(s0, s1)
        self._last_mem = d["mem"]
        n = out["ok"]
        cpu = max(d["cpu"] - idle * d["secs"], 0.0)
        scripts = d["calls"].get("evalsha", 0)
        return {"turns": n, "failed": clients * rounds - n, "errors": out["errors"], "wall": out["wall"],
                "cpu_us": cpu / n * 1e6 if n else None, "cmds": sum(d["calls"].values()) / n if n else None,
                "evalsha_us": d["usec"]["evalsha"] / scripts if scripts else None,
                "by_cmd": {k: v / n for k, v in d["calls"].items()} if n else {},
                "mem": d["mem"], "sessions": n // every if every else n}

    # -- the bench's server env: turns, memory, streams ------------------------------------------
    def _plain(self, redis: Redis, probe: Probe) -> None:
        r = self.results
        log("starting a server (1 worker) on a private redis-server")
        server = self._server(redis, "")
        lg = LoadGen("-sizing")
        try:
            self._warm(lg, server, {})
            r["idle_cpu_per_s"] = idle = self._idle_rate(probe)
            r["get_rt_us"] = probe.round_trip_cpu()
            self._wait_quiet("sizing")

            # sessions of 10 short turns: CPU, commands, memory
            c, n, every = self.turn_clients, self.turn_rounds, self.session_turns
            log(f"{c} clients x {n} short turns, sessions of {every}")
            t = self._turns(lg, server, probe, {}, idle, c, n, every, {"message": directive(tokens=5) + " short turn"})
            t.update(self._memory(probe, t["sessions"]))
            r["turn10"] = t

            # sessions of one turn, sent with a message_id (so the idempotency hash is there too)
            n1 = self.new_sessions
            log(f"{n1} new sessions of one short turn (with a message_id)")
            t = self._turns(lg, server, probe, {}, idle, 50, n1 // 50, 1,
                            {"message": directive(tokens=5) + " short turn", "message_id": "sizing-msg-1"})
            t.update(self._memory(probe, t["sessions"]))
            r["turn1"] = t

            r["stream"] = self._streams(lg, server, probe, idle)
        finally:
            lg.stop()
            self.b.stop_server("sizing", server)

    def _memory(self, probe: Probe, sessions: int) -> dict[str, Any]:
        """Memory of what the last load left: used_memory with and without the turns' logs, and
        MEMORY USAGE by key kind. (Run right after `_turns`, which started from an empty Redis.)"""
        if not sessions:
            return {}
        kinds = probe.keys_by_kind()
        before = probe.snap()["mem"]
        logs = probe.delete_logs()
        time.sleep(0.1)
        after = probe.snap()["mem"]
        return {"kinds": kinds, "logs": logs, "mem_per_log": (before - after) / logs if logs else None,
                "session_used_b": (after - before + self._last_mem) / sessions,  # used_memory, logs deleted
                "session_keys_b": sum(v["bytes"] for k, v in kinds.items() if k != "log") / sessions,
                "logs_b": kinds.get("log", {}).get("bytes", 0) / sessions}

    def _streams(self, lg: LoadGen, server: Server, probe: Probe, idle: float) -> dict[str, Any]:
        n, pace, window = self.streams, self.pace, self.window
        tokens = int((window + 30) * 1000 / pace)  # outlasts the window; cut when we disconnect
        body = {"message": directive(tokens=tokens, pace_ms=pace) + " sizing stream", "cancel_on_disconnect": True}
        probe.flush()
        log(f"{n} streams x {pace} ms a token, {window:.0f} s steady window")
        opened = lg.call({"cmd": "open", "group": "streams", "kind": "sse_post", "path": "/agent/stream",
                          "body": body, "count": n, "host": "127.0.0.1", "port": server.port, "timeout": 30})
        try:
            time.sleep(1.0)  # every stream past its first flush (EXPIRE) and into its stride
            s0 = probe.snap()
            time.sleep(window)
            s1 = probe.snap()
            per_event, logs, entries = probe.log_bytes_per_event()
        finally:
            lg.call({"cmd": "close", "group": "streams"})
        time.sleep(1.0)  # the cancelled turns commit
        d = probe.delta(s0, s1)
        got = opened["open"]
        xadds = d["calls"].get("xadd", 0)
        cpu = max(d["cpu"] - idle * d["secs"], 0.0)
        stream_secs = got * d["secs"]
        events_per_min = 60_000 / pace
        return {"n": got, "errors": opened["errors"], "secs": d["secs"], "xadds": xadds,
                "xadd_per_s": xadds / d["secs"], "xadd_per_stream_s": xadds / stream_secs if got else None,
                "cpu_us_per_xadd": cpu / xadds * 1e6 if xadds else None,
                "cmd_us_per_xadd": d["usec"].get("xadd", 0) / xadds if xadds else None,
                "cpu_us_per_stream_s": cpu / stream_secs * 1e6 if got else None,
                "cpu_share": cpu / d["secs"], "by_cmd": d["calls"],
                "mem_per_stream_min": d["mem"] / got * 60 / d["secs"] if got else None,
                "log_b_per_event": per_event, "log_per_stream_min": per_event * events_per_min,
                "logs": logs, "entries": entries, "events_per_min": events_per_min}

    # -- keys and limits on ------------------------------------------------------------------------
    def _limits(self, redis: Redis, probe: Probe) -> None:
        log("starting a server with a client key and the rate limits / stream caps on (set high)")
        server = self._server(redis, "-limits", LIMITS_ENV)
        lg = LoadGen("-sizing-limits")
        headers = {"Authorization": f"Bearer {KEY}"}
        try:
            self._warm(lg, server, headers)
            idle = self._idle_rate(probe)
            self._wait_quiet("sizing, limits on")
            c, n, every = self.turn_clients, self.turn_rounds, self.session_turns
            log(f"limits on: {c} clients x {n} short turns, sessions of {every}")
            t = self._turns(lg, server, probe, headers, idle, c, n, every,
                            {"message": directive(tokens=5) + " short turn"})
            t["kinds"] = probe.keys_by_kind()
            self.results["turn10_limits"] = t
        finally:
            lg.stop()
            self.b.stop_server("sizing limits", server)
            probe.flush()


def run(bench: Any) -> dict[str, Any]:
    return Sizing(bench).run()


# -- report -----------------------------------------------------------------------------------
def _f(v: float | None, digits: int = 1, unit: str = "") -> str:
    return "—" if v is None else f"{v:,.{digits}f}{unit}"


def _per_core(us: float | None) -> str:
    return "—" if not us else f"{1e6 / us:,.0f}"


def _cmds(by: dict[str, float], top: int = 8) -> str:
    items = sorted(by.items(), key=lambda kv: (-kv[1], kv[0]))
    return " ".join(f"{k}={v:.2f}".rstrip("0").rstrip(".") for k, v in items[:top])


def summary(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, what one Redis core / 1 GiB carries) rows for the main table."""
    rows = []
    for key, lab in (("turn10", "Redis CPU per short turn"), ("turn10_limits", "Redis CPU per short turn, limits on")):
        t = res.get(key)
        if t:
            rows.append((lab, _f(t["cpu_us"], 1, " µs"), f"{_per_core(t['cpu_us'])} turns/s per Redis core"))
    s = res.get("stream")
    if s:
        rows.append(("Redis CPU per stream-second", _f(s["cpu_us_per_stream_s"], 1, " µs"),
                     f"{_per_core(s['cpu_us_per_stream_s'])} streams per Redis core"))
    for key, lab in (("turn1", "Redis memory per session, 1 turn"), ("turn10", "Redis memory per session, 10 turns")):
        t = res.get(key)
        if t and t.get("session_used_b"):
            rows.append((lab, _f(t["session_used_b"] / 1024, 2, " KB"),
                         f"{2**30 / t['session_used_b']:,.0f} sessions per GiB (+ each turn's log for 10 min)"))
    t = res.get("turn1")
    if t and t.get("mem_per_log"):
        rows.append(("Redis memory per finished turn's log", _f(t["mem_per_log"] / 1024, 2, " KB"),
                     "a short turn's; kept EVENT_LOG_TTL_SECONDS"))
    if s and s["mem_per_stream_min"] is not None:
        rows.append(("event log per stream-minute", _f(s["mem_per_stream_min"] / 1024, 0, " KB"),
                     f"used_memory growth at {s['events_per_min']:,.0f} events/min"))
    return rows


def render(res: dict[str, Any], pace: float) -> list[str]:
    out = [f"[8] Redis sizing (private redis-server {res.get('redis_version', '?')}, server 1 worker; CPU = INFO "
           f"used_cpu_sys+user minus idle {res.get('idle_cpu_per_s', 0) * 1e3:.2f} ms/s; memory = used_memory "
           f"minus client buffers, MEMORY USAGE):",
           f"    yardstick: one GET round trip (1 client, unpipelined) = {_f(res.get('get_rt_us'))} µs of Redis CPU "
           f"on this box"]
    for key, lab in (("turn10", "short turns, sessions of 10, no keys"),
                     ("turn10_limits", "short turns, sessions of 10, key + limits on"),
                     ("turn1", "new sessions of 1 turn (with message_id)")):
        t = res.get(key)
        if not t:
            continue
        per_s = t["turns"] / t["wall"] if t["wall"] else 0
        out.append(f"    {lab:<46} {t['turns']} turns ({t['failed']} failed, {per_s:.0f}/s): Redis CPU "
                   f"{_f(t['cpu_us'])} µs/turn -> {_per_core(t['cpu_us'])} turns/s per core; {_f(t['cmds'], 2)} "
                   f"commands/turn (an EVALSHA {_f(t['evalsha_us'])} µs inside): {_cmds(t['by_cmd'])}")
        if t["errors"]:
            out.append(f"        errors: {t['errors']}")
    for key, lab in (("turn1", "1 turn"), ("turn10", "10 turns")):
        t = res.get(key)
        if not t or not t.get("kinds"):
            continue
        sessions = t["sessions"]
        kinds = " ".join(f"{k} {v['bytes'] / v['n']:,.0f} B" for k, v in sorted(t["kinds"].items()))
        out.append(f"    memory, {sessions} sessions of {lab:<9} used_memory {t['session_used_b'] / 1024:.2f} "
                   f"KB/session ({t['mem'] / sessions / 1024:.2f} KB with the turns' logs; a log "
                   f"{_f(t['mem_per_log'], 0, ' B')}); MEMORY USAGE: session keys {t['session_keys_b'] / 1024:.2f} "
                   f"KB + logs {t['logs_b'] / 1024:.2f} KB; per key: {kinds}")
    t = res.get("turn10_limits")
    if t and t.get("kinds"):
        rl = {k: v for k, v in t["kinds"].items() if k.startswith("rl:")}
        if rl:
            out.append("    limits on, rate-limit keys: " + " ".join(f"{k[3:]} {v['n']} x {v['bytes'] / v['n']:,.0f} B"
                                                               for k, v in sorted(rl.items())))
    s = res.get("stream")
    if s:
        out.append(f"    {s['n']} streams x {pace} ms a token, {s['secs']:.1f} s window: {s['xadd_per_s']:,.0f} XADD/s "
                   f"({_f(s['xadd_per_stream_s'], 1)} per stream-second), Redis CPU {s['cpu_share'] * 100:.1f}% of a "
                   f"core = {_f(s['cpu_us_per_xadd'])} µs per XADD (in commands {_f(s['cmd_us_per_xadd'])} µs), "
                   f"{_f(s['cpu_us_per_stream_s'])} µs per stream-second -> {_per_core(s['cpu_us_per_stream_s'])} "
                   f"streams per core; commands: {_cmds(s['by_cmd'])}")
        out.append(f"    event log: {_f(s['log_b_per_event'], 1)} B per event (MEMORY USAGE of {s['logs']} logs, "
                   f"{s['entries']} entries) = {s['log_per_stream_min'] / 1024:,.0f} KB per stream-minute at "
                   f"{s['events_per_min']:,.0f} events/min; used_memory growth "
                   f"{_f(s['mem_per_stream_min'] / 1024 if s['mem_per_stream_min'] is not None else None, 0, ' KB')} "
                   f"per stream-minute" + (f"; errors {s['errors']}" if s["errors"] else ""))
    return out
