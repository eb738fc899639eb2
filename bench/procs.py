"""Processes the benchmark starts (and always stops): a private Redis, the fake upstream,
our server, the seed app, the load generator. Plus /proc readers for CPU and memory."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results"
LOGS = RESULTS / "logs"
CLK_TCK = os.sysconf("SC_CLK_TCK")
API_KEY = "sk-ant-bench-0123456789"
UPSTREAM_CAP = 5000

_live: list["Proc"] = []


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies, so nothing is left behind."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def proc_cpu(pid: int) -> float:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem_kb(pid: int) -> dict[str, int]:
    """VmRSS (status) and Pss (smaps_rollup) in KiB."""
    out = {"rss": 0, "pss": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1])
    except OSError:
        pass
    return out


class Proc:
    """A subprocess in its own process group, logged to bench-results/logs/<name>.log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 stdout_pipe: bool = False, stdin_pipe: bool = False):
        LOGS.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOGS / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stderr=self._log, start_new_session=True, preexec_fn=_die_with_parent,
            text=stdout_pipe or stdin_pipe, bufsize=1 if (stdout_pipe or stdin_pipe) else -1)
        self.pid = self.proc.pid
        _live.append(self)

    def pids(self) -> list[int]:
        """This process and its children (uvicorn supervisor + workers)."""
        return [self.pid, *children(self.pid)]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self in _live:
            _live.remove(self)
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._log.close()


def stop_all() -> None:
    for p in list(reversed(_live)):
        try:
            p.stop(timeout=8)
        except Exception:  # noqa: BLE001 - keep stopping the others
            pass


def wait_http(url: str, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{proc.name} did not become ready at {url}:\n{proc.log_tail()}")


class Redis:
    """A private redis-server on a free port: its INFO counters see only our traffic."""

    def __init__(self, external_url: str | None = None):
        self.proc: Proc | None = None
        if external_url:
            self.url = external_url
            hostport = external_url.split("://", 1)[1].split("/", 1)[0]
            self.port = int(hostport.rsplit(":", 1)[1]) if ":" in hostport else 6379
            self.private = False
            return
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.private = True
        self.proc = Proc("redis", ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--daemonize", "no",
                                   "--maxclients", "10000"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start:\n{self.proc.log_tail()}")

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def command(self, *args: str) -> Any:
        """One command over a raw socket (bulk/simple/integer replies only)."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(payload.encode())
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if buf[:1] in (b"+", b"-", b":") and buf.endswith(b"\r\n"):
                    break
                if buf[:1] == b"$":
                    head, _, rest = buf.partition(b"\r\n")
                    if int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2:
                        break
        kind, body = buf[:1], buf[1:]
        if kind == b"+":
            return body.strip().decode()
        if kind == b"-":
            raise RuntimeError(body.strip().decode())
        if kind == b":":
            return int(body.strip())
        head, _, rest = body.partition(b"\r\n")
        return None if int(head) < 0 else rest[:int(head)].decode()

    def info(self, *sections: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in self.command("INFO", *sections).splitlines():
            if ":" in line and not line.startswith("#"):
                k, _, v = line.partition(":")
                out[k] = v
        return out

    def commandstats(self) -> dict[str, int]:
        stats = {}
        for k, v in self.info("commandstats").items():
            if k.startswith("cmdstat_"):
                fields = dict(x.split("=", 1) for x in v.split(","))
                stats[k[8:]] = int(fields["calls"])
        return stats

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


class Fake:
    def __init__(self) -> None:
        self.proc = Proc("fake", [sys.executable, "-m", "bench.fake", "--port", "0"], stdout_pipe=True)
        line = self.proc.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if "listening on " not in line:
            raise RuntimeError(f"fake upstream did not start: {line!r}\n{self.proc.log_tail()}")
        self.url = line.rsplit(" ", 1)[1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.proc.stop()


def base_env() -> dict[str, str]:
    """The bench's own environment minus what configures a server; OTEL_* too: tracing is on only
    where the benchmark asks for it (the "otel" target), never inherited from the shell."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("ANTHROPIC_", "REDIS_", "AGENT_", "WEB_CONCURRENCY", "OTEL_"))}


class Server:
    """`python -m server` (ours) or uvicorn on bench.seed_app (the seed)."""

    def __init__(self, kind: str, fake: Fake, redis_url: str | None, workers: int = 1,
                 extra_env: dict[str, str] | None = None, tag: str = ""):
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = base_env()
        env.update({"HOST": "127.0.0.1", "PORT": str(self.port), "WEB_CONCURRENCY": str(workers),
                    "ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": fake.url,
                    "ANTHROPIC_MAX_RETRIES": "0", "GRACEFUL_SHUTDOWN_SECONDS": "1",
                    # the per-worker upstream cap (default 32) would queue the load under test
                    "MAX_CONCURRENT_UPSTREAM": str(UPSTREAM_CAP),
                    "PYTHONUNBUFFERED": "1"})
        if redis_url and kind in ("ours", "aiohttp"):
            env["REDIS_URL"] = redis_url
        env.update(extra_env or {})
        name = f"{kind}{tag}-{self.port}"
        if kind in ("ours", "aiohttp"):  # (aiohttp: ours on the SDK's aiohttp client, one worker)
            argv = [sys.executable, "-m", "server" if kind == "ours" else "bench.aiohttp_server"]
        else:
            argv = [sys.executable, "-m", "uvicorn", "bench.seed_app:app", "--host", "127.0.0.1",
                    "--port", str(self.port), "--loop", "uvloop", "--http", "httptools",
                    "--workers", str(workers), "--log-level", "info"]
        self.proc = Proc(name, argv, env=env)
        wait_http(self.url + "/ready", self.proc)
        if workers > 1:  # wait until every worker answers (they start one by one)
            deadline = time.monotonic() + 30
            while len(children(self.proc.pid)) < workers and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)

    def pids(self) -> list[int]:
        return self.proc.pids()

    def memory_kb(self) -> dict[str, int]:
        total = {"rss": 0, "pss": 0}
        for pid in self.pids():
            m = proc_mem_kb(pid)
            total["rss"] += m["rss"]
            total["pss"] += m["pss"]
        return total

    def log_problems(self) -> tuple[int, list[tuple[int, str]]]:
        """(SIGTERMs the server logged, [(count, 'level: message (exception)')]) from its log so far."""
        sigterms, counts = 0, {}
        for line in self.proc.log_tail(50_000_000).splitlines():
            if not line.startswith("{"):
                if line.startswith(("ERROR:", "WARNING:")) or "Traceback" in line:
                    key = line.strip()[:120]
                    counts[key] = counts.get(key, 0) + 1
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            msg = str(rec.get("msg", ""))
            if msg.startswith("SIGTERM"):
                sigterms += 1
            if rec.get("level") not in ("warning", "error", "critical"):
                continue
            if msg.startswith("auth: OFF"):
                continue
            msg = re.sub(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{22}(?![A-Za-z0-9_-])", "<id>", msg)
            exc = str(rec.get("exc", "")).strip().splitlines()
            key = f"{rec['level']}: {msg}" + (f" ({exc[-1][:100]})" if exc else "")
            counts[key] = counts.get(key, 0) + 1
        return sigterms, sorted(((v, k) for k, v in counts.items()), reverse=True)

    def stop(self) -> None:
        self.proc.stop(timeout=20)


class LoadGen:
    """The load generator process; `call` sends one command and waits for its answer."""

    def __init__(self, tag: str = "") -> None:
        self.proc = Proc(f"loadgen{tag}", [sys.executable, "-m", "bench.loadgen"],
                         stdout_pipe=True, stdin_pipe=True)

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.proc.stdin is not None and self.proc.proc.stdout is not None
        self.proc.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.proc.stdin.flush()
        line = self.proc.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator died:\n{self.proc.log_tail()}")
        out = json.loads(line)
        if "error" in out and isinstance(out["error"], str):
            raise RuntimeError(f"load generator: {out['error']}\n{self.proc.log_tail()}")
        return out

    def stop(self) -> None:
        try:
            if self.proc.alive():
                assert self.proc.proc.stdin is not None
                self.proc.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.proc.stdin.flush()
                self.proc.proc.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.proc.stop()
