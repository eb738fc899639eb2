"""Where prometheus-client's multiprocess files go (see server/metrics.py for the why).

Kept apart from metrics.py, and free of prometheus-client imports, so that the supervisor
(`python -m server`) can prepare the directory before anything writes to it.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import re
import shutil
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"
_DIR_PREFIX = "agent-metrics-"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux); '' elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _configured() -> str | None:
    """The operator's directory. Set but empty (`PROMETHEUS_MULTIPROC_DIR=` from a copied
    .env.example) counts as unset and is removed: prometheus-client would otherwise switch to
    multiprocess mode on the variable's mere presence and write its files to the cwd."""
    path = os.environ.get(ENV)
    if path is not None and not path.strip():
        del os.environ[ENV]
        return None
    return path


def worker_dir() -> str | None:
    """The directory this process writes to, or None for the in-memory registry."""
    path = _configured()
    if path:
        os.makedirs(path, exist_ok=True)
        return path
    if multiprocessing.parent_process() is None:
        return None  # a single uvicorn process (or a test importing the app)
    ppid = os.getppid()
    base = tempfile.gettempdir()
    path = os.path.join(base, f"{_DIR_PREFIX}w-{ppid}-{_start_time(ppid) or 'x'}")
    # Dirs of supervisors that are gone (pid not running) are leftovers: remove them.
    for old in glob.glob(os.path.join(base, f"{_DIR_PREFIX}w-*")):
        match = re.fullmatch(r".*-w-(\d+)-[0-9x]+", old)
        if match and old != path and not alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ[ENV] = path
    return path


def prepare_supervisor(workers: int) -> str | None:
    """Called by `python -m server` before uvicorn starts its workers: give them one empty
    directory (a fresh temporary one, removed at exit, unless the operator named one)."""
    path = _configured()
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
        return path
    if workers <= 1:
        return None
    path = tempfile.mkdtemp(prefix=_DIR_PREFIX + "main-")
    os.environ[ENV] = path
    import atexit

    atexit.register(shutil.rmtree, path, True)
    return path
