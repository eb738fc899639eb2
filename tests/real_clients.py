"""The real clients the integration tests drive: headless Chromium (the chat page) and the
Vercel AI SDK's `ai` package under Node.js (tests/node/chat.mjs). Each installs what it needs
from the machine's package managers (apt-get, npm) when it is missing, or skips saying why."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
NODE_DIR = Path(__file__).resolve().parent / "node"


def install_chromium() -> str | None:
    """Install Debian's chromium + chromium-driver if missing; a reason to skip, or None."""
    if os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK):
        return None
    apt = shutil.which("apt-get")
    if apt is None:
        return "chromium is not installed and apt-get is not available on this machine"
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        return "chromium is not installed and apt-get needs root (no passwordless sudo)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("[chat page tests] installing chromium and chromium-driver with apt-get", file=sys.stderr, flush=True)
    for cmd in ([*prefix, apt, "update", "-qq"], [*prefix, apt, "install", "-y", "-qq", "chromium", "chromium-driver"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} or {CHROMEDRIVER} is missing")
    return None


def open_browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Selenium (skips with the reason printed where it cannot be installed)."""
    reason = install_chromium()
    if reason:
        print(f"[chat page tests] SKIPPED: {reason}", file=sys.stderr, flush=True)
        pytest.skip(reason)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chat-page-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def node_runner(script: str = "chat.mjs") -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    """run(scenario) -> the result of a runner in tests/node (chat.mjs, rewind.mjs: see their headers)."""
    node = shutil.which("node")
    if node is None:
        print("SKIP: `node` is not installed; the AI SDK client tests need Node.js 20+ (tests/node)")
        pytest.skip("`node` is not installed: the AI SDK client tests need Node.js 20+ (tests/node)")
    if not (NODE_DIR / "node_modules" / "ai").is_dir():
        npm = shutil.which("npm")
        assert npm, "node is installed but npm is not: cannot install tests/node"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600)

    async def run(scenario: dict[str, Any]) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            node, script, json.dumps(scenario), cwd=NODE_DIR,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, f"node exited {proc.returncode}: {err.decode()[-3000:]}"
        return json.loads(out)

    return run
