"""Where prometheus-client's multiprocess files go (`PROMETHEUS_MULTIPROC_DIR`).

The directory must be the same for every worker of one server and empty when it starts:
- `python -m server` (scripts/run) calls `prepare_supervisor` before uvicorn starts the
  workers: it wipes the operator's directory, or creates a fresh one for several workers;
- a worker of `uvicorn --workers N` started directly (Procfile, Dockerfile) with no
  directory given uses `$TMPDIR/agent-metrics-w-<supervisor pid>-<its start time>`: uvicorn
  spawns its workers, so they agree on it through their common parent, and a new supervisor
  starts from zero.
Free of prometheus-client imports: the supervisor never loads it.
"""

from __future__ import annotations

import atexit
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
            return f.read().decode(errors="replace").rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _configured() -> str | None:
    """The operator's directory. Set but empty (from a copied .env.example) counts as unset
    and is removed: prometheus-client would take its mere presence for multiprocess mode."""
    path = os.environ.get(ENV)
    if path is not None and not path.strip():
        del os.environ[ENV]
        return None
    return path


def worker_dir() -> str | None:
    """The directory this worker writes to (created), or None for the in-memory registry."""
    path = _configured()
    if path:
        os.makedirs(path, exist_ok=True)
        return path
    if multiprocessing.parent_process() is None:
        return None  # a single uvicorn process (or a test importing the app)
    ppid = os.getppid()
    base = tempfile.gettempdir()
    path = os.path.join(base, f"{_DIR_PREFIX}w-{ppid}-{_start_time(ppid) or 'x'}")
    for old in glob.glob(os.path.join(base, f"{_DIR_PREFIX}w-*")):  # of supervisors now gone
        match = re.fullmatch(r".*-w-(\d+)-[0-9x]+", old)
        if match and old != path and not alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ[ENV] = path
    return path


def prepare_supervisor(workers: int) -> str | None:
    """Before uvicorn starts the workers: one empty directory for them (the operator's, wiped,
    or for several workers a fresh temporary one, removed at exit)."""
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
    atexit.register(shutil.rmtree, path, True)
    return path
