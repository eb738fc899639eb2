"""Summarise a py-spy `--format raw` profile (collapsed stacks): where the server's CPU goes.

    python -m bench.profile_report bench-results/profile-ours.txt [--top 25]

Prints the hottest leaf lines (self time), the functions with the most inclusive time, and
a split by package (our server code, starlette, uvicorn, the SDK/httpx2, redis, asyncio, json).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def package(path: str) -> str:
    p = short(path)
    if p.startswith("server/"):
        return "server/" + p.split("/")[1].removesuffix(".py") if p.count("/") else p
    top = p.split("/", 1)[0].removesuffix(".py")
    return top


def load(path: str) -> list[tuple[list[tuple[str, str, str]], int]]:
    stacks = []
    with open(path) as f:
        for raw in f:
            raw = raw.rstrip("\n")
            if not raw:
                continue
            stack, _, count = raw.rpartition(" ")
            frames = []
            for fr in stack.split(";"):
                m = FRAME.match(fr)
                if m:
                    frames.append((m["func"], short(m["file"]), m["line"] or "?"))
                else:
                    frames.append((fr, "?", "?"))
            stacks.append((frames, int(count)))
    return stacks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    # An idle thread-pool worker blocked in its queue (work_queue.get) is sampled as busy by
    # py-spy (its wait does not look idle); it does no work, so it is left out.
    stacks = [(frames, n) for frames, n in load(a.path)
              if not (frames and frames[-1][0] == "_worker" and frames[-1][1].endswith("concurrent/futures/thread.py"))]
    # drop the leading thread/process frames py-spy may add ("process 123:..." / "thread ...")
    total = sum(c for _, c in stacks)
    self_line: Counter[str] = Counter()
    self_func: Counter[str] = Counter()
    incl_func: Counter[str] = Counter()
    by_pkg: Counter[str] = Counter()
    for frames, c in stacks:
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames:
            continue
        func, file, line = frames[-1]
        self_line[f"{func} ({file}:{line})"] += c
        self_func[f"{func} ({file})"] += c
        by_pkg[package(file)] += c
        seen = set()
        for func, file, _line in frames:
            key = f"{func} ({file})"
            if key not in seen:
                seen.add(key)
                incl_func[key] += c
    print(f"{total} samples (non-idle)")
    print(f"\nself time by line (top {a.top}):")
    for k, v in self_line.most_common(a.top):
        print(f"  {v / total * 100:5.1f}%  {k}")
    print(f"\nself time by function (top {a.top}):")
    for k, v in self_func.most_common(a.top):
        print(f"  {v / total * 100:5.1f}%  {k}")
    print(f"\ninclusive time by function (top {a.top * 2}):")
    for k, v in incl_func.most_common(a.top * 2):
        print(f"  {v / total * 100:5.1f}%  {k}")
    print("\nself time by package/module:")
    for k, v in by_pkg.most_common(30):
        print(f"  {v / total * 100:5.1f}%  {k}")


if __name__ == "__main__":
    main()
