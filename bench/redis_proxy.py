"""A counting TCP proxy in front of Redis, run in a thread of the benchmark process.

Counts client round trips exactly: on each connection, every switch from "Redis answered"
(or nothing yet) to "the client sends" is one round trip, so a pipeline or an EVALSHA is
one trip however many commands it carries. Connections that SUBSCRIBE (the cancel
listener) are counted apart. Also counts bytes each way.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field


@dataclass
class Counters:
    trips: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    pubsub_trips: int = 0
    connections: int = 0
    commands: dict[str, int] = field(default_factory=dict)  # client-sent, by name

    def snapshot(self) -> dict:
        return {"trips": self.trips, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "pubsub_trips": self.pubsub_trips, "connections": self.connections,
                "commands": dict(self.commands)}


class CommandCounter:
    """Incremental RESP request parser: counts the commands a client sends, by name."""

    def __init__(self, counts: dict[str, int]):
        self.counts = counts
        self.buf = b""

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            used = self._one(self.buf)
            if used == 0:
                return
            self.buf = self.buf[used:]

    def _one(self, buf: bytes) -> int:
        """Bytes of one complete command at the start of buf (0 if incomplete)."""
        if not buf.startswith(b"*"):  # inline command
            end = buf.find(b"\r\n")
            if end < 0:
                return 0
            name = buf[:end].split(b" ", 1)[0].decode(errors="replace").lower()
            self.counts[name] = self.counts.get(name, 0) + 1
            return end + 2
        end = buf.find(b"\r\n")
        if end < 0:
            return 0
        n, pos, name = int(buf[1:end]), end + 2, None
        for _ in range(n):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return 0
            size = int(buf[pos + 1:end])
            if len(buf) < end + 2 + size + 2:
                return 0
            if name is None:
                name = buf[end + 2:end + 2 + size].decode(errors="replace").lower()
            pos = end + 2 + size + 2
        self.counts[name or "?"] = self.counts.get(name or "?", 0) + 1
        return pos


class RedisProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.counters = Counters()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> "RedisProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("redis proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        c = self.counters
        c.connections += 1
        state = {"last": "s", "pubsub": False}
        counter = CommandCounter(c.commands)
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cwriter.close()
            return

        async def up() -> None:
            while data := await creader.read(65536):
                if b"SUBSCRIBE" in data[:64].upper():
                    state["pubsub"] = True
                if state["last"] == "s":
                    if state["pubsub"]:
                        c.pubsub_trips += 1
                    else:
                        c.trips += 1
                if not state["pubsub"]:
                    counter.feed(data)
                state["last"] = "c"
                c.bytes_up += len(data)
                swriter.write(data)
                await swriter.drain()
            swriter.close()

        async def down() -> None:
            while data := await sreader.read(65536):
                state["last"] = "s"
                c.bytes_down += len(data)
                cwriter.write(data)
                await cwriter.drain()
            cwriter.close()

        try:
            await asyncio.gather(up(), down(), return_exceptions=True)
        finally:
            for w in (cwriter, swriter):
                try:
                    w.close()
                except Exception:  # noqa: BLE001
                    pass
            self._tasks.discard(task)

    def snapshot(self) -> dict[str, int]:
        return self.counters.snapshot()

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0.05)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
