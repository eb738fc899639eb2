"""A launcher for crash tests: uvicorn workers forked from one warm parent.

`uvicorn --workers` replaces a dead worker with a fresh interpreter that imports the whole
app again (seconds of CPU); a test that SIGKILLs a worker fifty times would spend most of
its time there. Here the parent imports the app once, binds the socket and forks the
workers; a killed one is replaced by a new fork in milliseconds. Each worker is a real
`uvicorn.Server` serving the real app on the shared listening socket, as uvicorn's own
workers do. Run as `python -m tests.forking_server` with the server's environment.
"""

from __future__ import annotations

import os
import signal
import socket


def main() -> None:
    from server.metrics import prepare_supervisor

    workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
    prepare_supervisor(workers)
    import uvicorn

    from server.app import app  # (imported once: every fork shares it)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"])))
    sock.listen(2048)
    children: set[int] = set()
    stopping = False

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            config = uvicorn.Config(app, loop="uvloop", http="httptools", ws_per_message_deflate=False,
                                    log_level=os.environ.get("LOG_LEVEL", "info").lower(),
                                    timeout_graceful_shutdown=30)
            uvicorn.Server(config).run(sockets=[sock])
            os._exit(0)
        children.add(pid)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(workers):
        spawn()
    while children:
        pid, _status = os.wait()
        children.discard(pid)
        if not stopping:
            spawn()


if __name__ == "__main__":
    main()
