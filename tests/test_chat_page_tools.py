"""The chat page's approve / deny buttons, in real headless Chromium (as tests/test_chat_page.py:
Debian's chromium and chromium-driver, installed with apt-get when missing).

Screenshots: test-artifacts/chat-page-approval.png (a call waiting for approval) and
chat-page-approval-decided.png (approved, denied, and decided over HTTP by another client).
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from .test_chat_page import SCREENSHOT, Page, page_server, wait_for

PENDING_SHOT = SCREENSHOT.with_name("chat-page-approval.png")
DECIDED_SHOT = SCREENSHOT.with_name("chat-page-approval-decided.png")


def tool_view(page: Page, i: int) -> dict[str, Any]:
    """Answer i's (first) tool call: its state line, decision, buttons and whole text."""
    return page.js("""
        const a = document.querySelectorAll('article.msg.assistant')[arguments[0]];
        const t = a && a.querySelector('details.tool');
        if (!t) return {};
        return {state: t.querySelector('.tool-state').textContent, open: t.open, text: t.textContent,
                pending: t.classList.contains('pending'), failed: t.classList.contains('failed'),
                buttons: Array.from(t.querySelectorAll('.approval button')).map(b => b.textContent),
                decision: (t.querySelector('.decision') || {}).textContent || null};""", i)


def click(page: Page, i: int, label: str) -> None:
    from selenium.webdriver.common.by import By

    answer = page.d.find_elements(By.CSS_SELECTOR, "article.msg.assistant")[i]
    button = next(b for b in answer.find_elements(By.CSS_SELECTOR, ".approval button") if b.text == label)
    button.click()


def test_approve_and_deny_buttons(browser, start_server, upstream):
    server = page_server(start_server, TOOLS_REQUIRING_APPROVAL="calculator")
    page = Page(browser, server)
    page.js("window.__violations = []; document.addEventListener('securitypolicyviolation', "
            "(e) => window.__violations.push(e.violatedDirective));")

    # The model calls the calculator: the turn waits, the page asks.
    page.send("What is 6*7?")
    waiting = wait_for(lambda: (lambda t: t if t.get("buttons") else None)(tool_view(page, 0)),
                       what="the approve / deny buttons")
    assert waiting["buttons"] == ["Approve", "Deny"] and waiting["open"] and waiting["pending"]
    assert waiting["state"] == "waiting for your approval" and "6*7" in waiting["text"]
    assert page.answer(0)["busy"] == "true" and page.state()["running"], "the turn is still running"
    page.screenshot(PENDING_SHOT, top=False)

    click(page, 0, "Approve")
    first = page.wait_answer(0)
    assert first["text"] == "The result is 42."
    tool = tool_view(page, 0)
    assert tool["buttons"] == [] and tool["decision"] == "Approved" and not tool["pending"]
    assert "result: 42" in tool["text"] and tool["state"] == "done: 42"

    # Denied: the model is told, and says so.
    page.send("And 3*3?")
    wait_for(lambda: tool_view(page, 1).get("buttons"), what="the buttons of the second call")
    click(page, 1, "Deny")
    second = page.wait_answer(1)
    assert second["text"] == "The tool failed: The user denied this tool call."
    tool = tool_view(page, 1)
    assert tool["decision"] == "Denied" and tool["state"] == "denied" and tool["failed"] and tool["buttons"] == []
    assert "error: The user denied this tool call." in tool["text"]

    # Decided elsewhere (here: over HTTP): the page shows the decision and drops its buttons.
    page.send("And 2+5?")
    wait_for(lambda: tool_view(page, 2).get("buttons"), what="the buttons of the third call")
    session_id = page.state()["sessionId"]
    tool_use_id = _pending_call(server.url, session_id)
    r = httpx.post(f"{server.url}/sessions/{session_id}/tool-approvals",
                   json={"tool_use_id": tool_use_id, "approved": True}, timeout=10)
    assert r.status_code == 202, r.text
    assert page.wait_answer(2)["text"] == "The result is 7."
    assert tool_view(page, 2)["decision"] == "Approved" and tool_view(page, 2)["buttons"] == []
    assert page.js("return window.__violations") == []
    page.screenshot(DECIDED_SHOT)

    # The server's history: approved, denied, approved.
    view = httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).json()
    results = [b for m in view["messages"] if m["role"] == "user" and isinstance(m["content"], list)
               for b in m["content"] if b.get("type") == "tool_result"]
    assert [r.get("is_error", False) for r in results] == [False, True, False]


def _pending_call(url: str, session_id: str) -> str:
    """The call the session's running turn waits for, from its event log (GET /sessions/{id}/stream)."""
    with httpx.stream("GET", f"{url}/sessions/{session_id}/stream", timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "tool_approval_request":
                    return event["tool_use_id"]
    raise AssertionError("no tool_approval_request in the running turn's log")
