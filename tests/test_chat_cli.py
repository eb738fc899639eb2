"""`scripts/chat`, the terminal client: one session across lines, over WebSocket and SSE, and
Ctrl-C (SIGINT) cancelling the answer being streamed."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from .harness import ROOT, Server

CLIENT = [sys.executable, str(ROOT / "scripts" / "chat.py")]


def run_chat(server: Server, lines: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLIENT, "--url", server.url, *args], input=lines, capture_output=True,
                          text=True, timeout=60)


def session_of(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.startswith("session: ")][-1].split()[1]


def test_a_conversation_over_websocket_then_sse(shared_server, upstream):
    upstream.script({"text": "First answer."},
                    {"tool_use": [{"name": "calculator", "input": {"expression": "2+3"}}]}, {"text": "Five."})
    done = run_chat(shared_server, "hello\nwhat is 2+3?\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "First answer.\nFive.\n"
    assert "· calculator {\"expression\": \"2+3\"}" in done.stderr and "→ 5" in done.stderr
    session_id = session_of(done.stderr)

    upstream.script({"text": "Third, over SSE."})
    done = run_chat(shared_server, "and now?\n", "--sse", f"--session={session_id}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Third, over SSE.\n"
    assert session_of(done.stderr) == session_id
    sent = upstream.requests()[-1]["body"]["messages"]
    assert len(sent) == 7, "one session across lines and transports"


@pytest.mark.parametrize("mode", [[], ["--sse"]], ids=["websocket", "sse"])
def test_ctrl_c_cancels_the_running_answer(shared_server, upstream, mode):
    proc = subprocess.Popen([*CLIENT, "--url", shared_server.url, *mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    assert proc.stdin is not None
    proc.stdin.write('count #fake{"tokens": 400, "pace_ms": 25}\n')
    proc.stdin.flush()
    deadline = time.monotonic() + 20
    while "tok5 " not in "".join(out):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(out)
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.close()  # then Ctrl-D: quit
    proc.wait(30)
    reader.join(5)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert "[stopped;" in err, err
    text = "".join(out).strip()
    assert text.startswith("tok0 tok1") and "tok399" not in text
    view = httpx.get(f"{shared_server.url}/sessions/{session_of(err)}").json()
    assert view["turn_records"][-1]["status"] == "cancelled"
    assert view["messages"][-1]["content"][0]["text"].startswith("tok0 tok1")


def test_an_id_starting_with_a_dash_reaches_the_client_whole(monkeypatch):
    """Ids made before new ones stopped starting with `-` stay valid: `--session=ID` takes them."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import chat

    seen: list[str | None] = []
    monkeypatch.setattr(chat, "Chat", lambda args: type("Probe", (), {"run": lambda self: seen.append(args.session) or 0})())
    assert chat.main(["--session=-Xy_12"]) == 0
    assert seen == ["-Xy_12"]


def test_new_session_and_turn_ids_never_start_with_a_dash():
    from server.store.base import new_id

    # one old id in 64 started with '-': 2,000 draws would all miss it with probability ~2e-14
    assert not [value for value in (new_id() for _ in range(2000)) if value.startswith("-")]
