"""The load generator: a separate process driven line by line over stdin/stdout.

Kept cheap so it does not starve the server on a 2-core box: uvloop, raw asyncio protocols
and the httptools (llhttp) parser; a response body is never decoded, only scanned for the
bytes `text_delta` (one per text event in all three targets: our events, the seed's frames
and the fake's own `content_block_delta`s). WebSockets use the `websockets` package.

Commands (one JSON object per line in, one JSON object per line out):
    {"cmd": "run", ...}      closed-loop load: `clients` clients, each `rounds` requests in
                             sequence on a keep-alive connection; reports per-request timings
                             and the CPU (utime+stime) of `cpu_pids` over the load window
    {"cmd": "open", ...}     open `count` WebSockets or SSE streams and keep them open
    {"cmd": "close", "group": name}
    {"cmd": "quit"}
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
import traceback
from typing import Any

import httptools
import uvloop

CLK_TCK = os.sysconf("SC_CLK_TCK")
MARK = b"text_delta"
TAIL = len(MARK) - 1
now = time.perf_counter


# -- /proc -------------------------------------------------------------------------------
def proc_cpu(pid: int, user: bool = True) -> float:
    """utime + stime (stime alone with `user=False`) of one process in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(b")") + 2:].split()
    return ((int(fields[11]) if user else 0) + int(fields[12])) / CLK_TCK


def cpu_snapshot(groups: dict[str, list[int]]) -> dict[str, float]:
    snap = {name: sum(proc_cpu(p) for p in pids) for name, pids in groups.items()}
    snap["server_kernel"] = sum(proc_cpu(p, user=False) for p in groups.get("server", []))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    snap["loadgen"] = ru.ru_utime + ru.ru_stime
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    snap["box_busy"] = (sum(parts) - parts[3] - parts[4]) / CLK_TCK  # minus idle and iowait
    snap["box_total"] = sum(parts) / CLK_TCK
    return snap


def cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(b[k] - a[k], 4) for k in a}


# -- a minimal HTTP/1.1 client -------------------------------------------------------------
class Response:
    __slots__ = ("status", "headers", "t_first_byte", "t_first_text", "t_end", "n_text", "tail",
                 "chunks", "collect", "done", "keep_alive", "error")

    def __init__(self, collect: bool, loop: asyncio.AbstractEventLoop):
        self.status = 0
        self.headers: dict[str, str] = {}
        self.t_first_byte: float | None = None
        self.t_first_text: float | None = None
        self.t_end: float | None = None
        self.n_text = 0
        self.tail = b""
        self.chunks: list[bytes] = []
        self.collect = collect
        self.done: asyncio.Future[None] = loop.create_future()
        self.keep_alive = False
        self.error: str | None = None


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    WANT_HEADERS = {b"x-session-id", b"x-turn-id"}

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: Any = None
        self.resp: Response | None = None
        self.closed = False
        self._hname = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        r = self.resp
        if r is not None and not r.done.done():
            r.error = "connection lost" + (f": {exc}" if exc else "")
            r.t_end = now()
            r.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            r = self.resp
            if r is not None and not r.done.done():
                r.error = f"bad response: {exc}"
                r.done.set_result(None)
            self.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in self.WANT_HEADERS:
            self.resp.headers[name.decode()] = value.decode()  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        r = self.resp
        r.status = self.parser.get_status_code()  # type: ignore[union-attr]
        r.keep_alive = self.parser.should_keep_alive()  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        r = self.resp
        if r.t_first_byte is None:  # type: ignore[union-attr]
            r.t_first_byte = now()  # type: ignore[union-attr]
        s = r.tail + body  # type: ignore[union-attr]
        n = s.count(MARK)
        if n:
            if not r.n_text:  # type: ignore[union-attr]
                r.t_first_text = now()  # type: ignore[union-attr]
            r.n_text += n  # type: ignore[union-attr]
        r.tail = s[-TAIL:]  # type: ignore[union-attr]
        if r.collect:  # type: ignore[union-attr]
            r.chunks.append(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        r = self.resp
        if r is not None and not r.done.done():
            r.t_end = now()
            r.done.set_result(None)

    def send(self, request: bytes, collect: bool) -> Response:
        loop = asyncio.get_running_loop()
        self.resp = Response(collect, loop)
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(request)  # type: ignore[union-attr]
        return self.resp

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


async def connect(host: str, port: int) -> Conn:
    loop = asyncio.get_running_loop()
    _t, proto = await loop.create_connection(Conn, host, port)
    return proto


def build_request(method: str, host: str, port: int, path: str, headers: dict[str, str],
                  body: bytes | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: agent-bench"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


# -- closed-loop load ----------------------------------------------------------------------
async def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], spec["port"]
    clients, rounds = int(spec["clients"]), int(spec["rounds"])
    method, path = spec.get("method", "POST"), spec["path"]
    headers = spec.get("headers", {})
    base_body: dict[str, Any] | None = spec.get("body")
    session_every = int(spec.get("session_every", 0))  # 0: every request starts a new session
    collect = bool(spec.get("collect_json", False)) or session_every > 0
    timeout = float(spec.get("timeout", 120))
    ramp = float(spec.get("ramp_s", 0.0))
    fixed = build_request(method, host, port, path, headers,
                          json.dumps(base_body).encode() if base_body is not None else None)
    records: list[list[Any]] = []  # [t_start, ttfb, ttft, duration, n_text, status, error]
    cpu_groups = {k: list(v) for k, v in spec.get("cpu_pids", {}).items()}
    t_begin = now()

    async def client(i: int) -> None:
        if ramp:
            await asyncio.sleep(ramp * i / clients)
        conn: Conn | None = None
        sid: str | None = None
        for r in range(rounds):
            if session_every:
                if r % session_every == 0:
                    sid = None
                body = dict(base_body or {})
                if sid:
                    body["session_id"] = sid
                request = build_request(method, host, port, path, headers, json.dumps(body).encode())
            else:
                request = fixed
            t0 = now()
            try:
                if conn is None or conn.closed:
                    conn = await connect(host, port)
                resp = conn.send(request, collect)
                await asyncio.wait_for(asyncio.shield(resp.done), timeout)
            except asyncio.TimeoutError:
                records.append([t0 - t_begin, None, None, now() - t0, 0, 0, "timeout"])
                if conn is not None:
                    conn.close()
                conn = None
                continue
            except OSError as exc:
                records.append([t0 - t_begin, None, None, now() - t0, 0, 0, f"connect: {exc}"])
                conn = None
                await asyncio.sleep(0.05)
                continue
            end = resp.t_end or now()
            err = resp.error
            if resp.status >= 400 and not err:
                err = f"HTTP {resp.status}: {b''.join(resp.chunks)[:200]!r}"
            records.append([t0 - t_begin,
                            (resp.t_first_byte - t0) if resp.t_first_byte else None,
                            (resp.t_first_text - t0) if resp.t_first_text else None,
                            end - t0, resp.n_text, resp.status, err])
            if session_every and resp.chunks and not err:
                try:
                    sid = json.loads(b"".join(resp.chunks)).get("session_id") or sid
                except ValueError:
                    pass
            if not resp.keep_alive or err:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    before = cpu_snapshot(cpu_groups)
    t0 = now()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = now() - t0
    after = cpu_snapshot(cpu_groups)
    errors: dict[str, int] = {}
    for rec in records:
        if rec[6]:
            key = str(rec[6])[:160]
            errors[key] = errors.get(key, 0) + 1
    return {"records": records, "wall": wall, "cpu": cpu_delta(before, after), "errors": errors}


# -- holding connections open ----------------------------------------------------------------
class Holder:
    def __init__(self) -> None:
        self.groups: dict[str, list[Any]] = {}
        self.sessions: dict[str, list[str]] = {}

    async def open(self, spec: dict[str, Any]) -> dict[str, Any]:
        name, kind, count = spec["group"], spec["kind"], int(spec["count"])
        host, port = spec["host"], spec["port"]
        sem = asyncio.Semaphore(int(spec.get("open_concurrency", 50)))
        timeout = float(spec.get("timeout", 30))
        items: list[Any] = self.groups.setdefault(name, [])
        sids: list[str] = self.sessions.setdefault(name, [])
        errors: dict[str, int] = {}
        opened: list[int] = []
        t0 = now()

        async def one_ws(i: int) -> None:
            from websockets.asyncio.client import connect as ws_connect
            async with sem:
                ws = await asyncio.wait_for(ws_connect(f"ws://{host}:{port}{spec['path']}", ping_interval=None,
                                                       compression=None, open_timeout=timeout), timeout)
                items.append(ws)
                opened.append(1)

        async def one_sse(i: int) -> None:
            async with sem:
                if kind == "sse_resume":
                    of = self.sessions[spec["of_group"]]
                    path = f"/sessions/{of[i % len(of)]}/stream"
                    request = build_request("GET", host, port, path, {"Accept": "text/event-stream"}, None)
                else:
                    request = build_request("POST", host, port, spec["path"], {"Accept": "text/event-stream"},
                                            json.dumps(spec["body"]).encode())
                conn = await connect(host, port)
                items.append(conn)  # closed with the group even if it failed
                resp = conn.send(request, True)
                deadline = now() + timeout
                while resp.t_first_byte is None and not resp.done.done():
                    if now() > deadline:
                        raise TimeoutError("no first event")
                    await asyncio.sleep(0.01)
                if resp.status != 200 or resp.error:
                    raise RuntimeError(f"HTTP {resp.status} {resp.error or ''} {b''.join(resp.chunks)[:120]!r}")
                resp.collect, resp.chunks = False, []
                if "x-session-id" in resp.headers:
                    sids.append(resp.headers["x-session-id"])
                opened.append(1)

        async def guarded(i: int) -> None:
            try:
                await (one_ws(i) if kind == "ws" else one_sse(i))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                key = f"{type(exc).__name__}: {exc}"[:160]
                errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(guarded(i) for i in range(count)))
        return {"group": name, "open": len(opened), "errors": errors, "secs": round(now() - t0, 3)}

    async def close(self, name: str) -> dict[str, Any]:
        items = self.groups.pop(name, [])
        self.sessions.pop(name, None)
        closers = []
        for item in items:
            if isinstance(item, Conn):
                item.close()
            else:
                closers.append(item.close())
        if closers:
            for i in range(0, len(closers), 200):
                await asyncio.gather(*closers[i:i + 200], return_exceptions=True)
        return {"group": name, "closed": len(items)}


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    holder = Holder()
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "run":
                out = await run_load(cmd)
            elif cmd["cmd"] == "open":
                out = await holder.open(cmd)
            elif cmd["cmd"] == "close":
                out = await holder.close(cmd["group"])
            elif cmd["cmd"] == "quit":
                for name in list(holder.groups):
                    await holder.close(name)
                break
            else:
                out = {"error": f"unknown command {cmd['cmd']!r}"}
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            out = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    uvloop.run(main())
