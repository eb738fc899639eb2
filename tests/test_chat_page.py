"""The built-in chat page (`GET /`) in real headless Chromium, driven by Selenium.

Debian's `chromium` and `chromium-driver` packages are used (never a downloaded browser): the
module installs them with apt-get when they are missing, and skips with the reason printed
only where apt-get cannot be used. Screenshots: test-artifacts/chat-page.png and
chat-page-thinking.png (thinking, server tools, sources).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import httpx

from .harness import ROOT, Server, free_port

SCREENSHOT = ROOT / "test-artifacts" / "chat-page.png"
FULL_60 = " ".join(f"tok{i}" for i in range(60))


def page_server(start_server: Callable[..., Server], **env: Any) -> Server:
    # The page's WebSocket carries an Origin (its own); allow it explicitly.
    port = free_port()
    return start_server(PORT=port, ALLOWED_ORIGINS=f"http://127.0.0.1:{port}", **env)


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.03)


class Page:
    def __init__(self, driver: Any, server: Server):
        self.d = driver
        self.server = server
        driver.get(server.url + "/")
        wait_for(lambda: self.state().get("connected"), what="the WebSocket to connect")

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def state(self) -> dict[str, Any]:
        return self.js("return window.__agent ? window.__agent.state() : {}")

    def screenshot(self, path: Any, top: bool = True) -> None:
        """Save a screenshot under test-artifacts/ (`top`: scrolled to the top first)."""
        if top:
            self.js("window.scrollTo(0, 0)")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.d.save_screenshot(str(path))

    def reload_into(self, session_id: str, what: str) -> None:
        """Reload the page and wait until it has reopened `session_id` (connected, history loaded)."""
        self.d.refresh()
        wait_for(lambda: (lambda s: s.get("connected") and not s.get("loading") and s.get("sessionId") == session_id)(
            self.state()), what=what)

    def send(self, text: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = self.d.find_element(By.ID, "input")
        box.clear()
        self.js("arguments[0].value = arguments[1]", box, text)  # send_keys would type '{' slowly
        box.send_keys(Keys.ENTER)

    def answers(self) -> list[dict[str, Any]]:
        return self.js("""
            return Array.from(document.querySelectorAll('article.msg.assistant')).map(a => ({
              text: Array.from(a.querySelectorAll('.answer > .text')).map(t => t.textContent).join(''),
              state: a.dataset.state || null, busy: a.getAttribute('aria-busy'),
              tools: Array.from(a.querySelectorAll('details.tool')).map(t => t.textContent),
              notes: Array.from(a.querySelectorAll('.notice, .meta, .error')).map(n => n.textContent)}));""")

    def answer(self, i: int) -> dict[str, Any]:
        answers = self.answers()
        return answers[i] if len(answers) > i else {}

    def wait_answer(self, i: int, states: tuple[str, ...] = ("done",), timeout: float = 20) -> dict[str, Any]:
        return wait_for(lambda: (lambda a: a if a.get("state") in states else None)(self.answer(i)),
                        timeout, f"answer {i} to be {states}")


def test_stream_tools_and_resume_after_a_dropped_connection(browser, start_server, upstream):
    server = page_server(start_server)
    page = Page(browser, server)
    assert browser.find_element("id", "offline").is_displayed() is False, "a real upstream: no banner"
    assert page.js("return document.getElementById('log').getAttribute('role')") == "log"
    assert page.js("return document.querySelector('label[for=input]').textContent") == "Message"

    # A turn with a tool call: the call, its input and its result are shown.
    upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "6*7"}}]},
                    {"text": "6 × 7 is 42."})
    page.send("What is 6*7?")
    first = page.wait_answer(0)
    assert first["text"] == "6 × 7 is 42."
    assert len(first["tools"]) == 1
    assert "Tool: calculator" in first["tools"][0] and "6*7" in first["tools"][0]
    assert "result: 42" in first["tools"][0] and "done" in first["tools"][0]
    session_id = page.state()["sessionId"]
    assert session_id

    # A slow answer; the socket is dropped mid-stream, the page reconnects and resumes.
    page.send('Count for me #fake{"tokens":60,"pace_ms":50}')
    wait_for(lambda: "tok5 " in page.answer(1).get("text", ""), what="the answer to start streaming")
    page.js("window.__agent.dropConnection()")
    at_drop = page.answer(1)["text"]
    assert FULL_60.startswith(at_drop) and len(at_drop) < len(FULL_60), "dropped mid-answer"
    wait_for(lambda: not page.state()["connected"], 5, "the socket to close")
    second = page.wait_answer(1, timeout=30)
    assert second["text"] == FULL_60, "the whole answer exactly once: nothing lost, nothing repeated"
    state = page.state()
    assert state["sessionId"] == session_id, "the same session after reconnecting"
    assert state["stats"]["drops"] == 1 and state["stats"]["resumes"] == 1
    assert state["stats"]["connects"] == 2
    assert state["connected"] and not state["running"]
    assert any("out tokens" in n for n in second["notes"])

    # The server agrees: one session, two turns, the full answer committed.
    view = httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).json()
    assert view["turns"] == 2
    assert view["messages"][-1]["content"][0]["text"] == FULL_60

    # One more ordinary turn after the resume, on the same socket.
    upstream.script({"text": "Still here, same conversation."})
    page.send("Are you still there?")
    assert page.wait_answer(2)["text"] == "Still here, same conversation."
    assert page.state()["stats"]["connects"] == 2

    # A resume that asks for too much (from the turn's start): the replayed events are skipped.
    page.send('Once more #fake{"tokens":60,"pace_ms":30}')
    wait_for(lambda: "tok3 " in page.answer(3).get("text", ""), what="the answer to start streaming")
    page.js("window.__agent.dropConnection({resumeFrom: 0})")
    assert page.wait_answer(3, timeout=30)["text"] == FULL_60
    stats = page.state()["stats"]
    assert stats["resumes"] == 2 and stats["duplicates"] >= 4, stats
    page.screenshot(SCREENSHOT)


def test_stop_button_cancels_the_running_turn(browser, start_server, upstream):
    from selenium.webdriver.common.by import By

    server = page_server(start_server)
    page = Page(browser, server)
    stop = browser.find_element(By.ID, "stop")
    assert not stop.is_enabled(), "nothing to stop yet"
    page.send('Go on for a while #fake{"tokens":400,"pace_ms":30}')
    wait_for(lambda: "tok3 " in page.answer(0).get("text", ""), what="streaming")
    assert stop.is_enabled() and not browser.find_element(By.ID, "send").is_enabled()
    stop.click()
    answer = page.wait_answer(0, ("cancelled",))
    assert "Stopped." in answer["notes"]
    assert answer["text"] and len(answer["text"]) < len(" ".join(f"tok{i}" for i in range(400)))
    assert not stop.is_enabled() and browser.find_element(By.ID, "send").is_enabled()
    session_id = page.state()["sessionId"]
    view = httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).json()
    assert view["turns"] == 1 and view["running_turn_id"] is None
    assert view["turn_records"][-1]["status"] == "cancelled"

    # The session is deleted while the page is away: the reconnect is refused, the page finds
    # out why over HTTP and starts over with a new session.
    assert httpx.delete(f"{server.url}/sessions/{session_id}").status_code == 204
    page.js("window.__agent.dropConnection()")
    wait_for(lambda: (lambda s: s["connected"] and s["sessionId"] is None)(page.state()), 15,
             "a fresh connection without the deleted session")
    upstream.script({"text": "A new beginning."})
    page.send("hello again")
    assert page.wait_answer(1)["text"] == "A new beginning."
    assert page.state()["sessionId"] not in (None, session_id)


def test_offline_mode_banner(browser, start_server):
    server = page_server(start_server, ANTHROPIC_API_KEY="", ANTHROPIC_BASE_URL="", OFFLINE_PACE_MS=1)
    assert httpx.get(server.url + "/health").json()["offline_model"] is True
    page = Page(browser, server)
    banner = wait_for(lambda: (lambda b: b if b.is_displayed() else None)(browser.find_element("id", "offline")),
                      what="the offline banner")
    assert "Offline mode" in banner.text and "ANTHROPIC_API_KEY" in banner.text
    page.send("hello")
    answer = page.wait_answer(0)
    assert answer["text"], "the bundled offline model answers"


def test_page_headers_and_assets(start_server):
    server = start_server()
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    for asset, kind in (("chat.js", "javascript"), ("chat.css", "text/css")):
        a = httpx.get(f"{server.url}/static/{asset}")
        assert a.status_code == 200 and kind in a.headers["content-type"]
    assert httpx.get(server.url + "/static/__init__.py").status_code == 404, "only the web/ folder is served"
    assert json.loads(httpx.get(server.url + "/health").text)["offline_model"] is False


THOUGHT = " ".join(["The user asks for the capital of France; I will search the web and check it by running code."] * 3)
WIKI = "https://en.example.org/wiki/Paris"
EVIL_TITLE = '<img src=x onerror="window.__pwned=1">Evil'


def _cite(url: str, title: str) -> dict[str, Any]:
    return {"type": "web_search_result_location", "url": url, "title": title, "cited_text": "Paris is the capital.",
            "encrypted_index": "Eo8BCioIAhgB"}


def test_thinking_server_tools_citations_and_finish_notes(browser, start_server, upstream):
    """Thinking streams into its own folding section, never into the answer; Anthropic's tools
    are marked as such, with search results as links and code output as text; citations are
    numbered sources under the answer; refusals and cut-off answers get a note. Nothing the
    model or a tool wrote becomes markup, and only http(s) links are made."""
    server = page_server(start_server, SERVER_TOOLS="web_search,code_execution")
    page = Page(browser, server)
    page.js("window.__violations = []; document.addEventListener('securitypolicyviolation', "
            "(e) => window.__violations.push(e.violatedDirective));")
    upstream.script({"pace_ms": 40, "blocks": [
        {"type": "thinking", "thinking": THOUGHT},
        {"type": "server_tool_use", "id": "srvtoolu_search", "name": "web_search", "input": {"query": "capital"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_search", "content": [
            {"type": "web_search_result", "url": WIKI, "title": "Paris - Encyclopedia", "encrypted_content": "E1",
             "page_age": "2 days ago"},
            {"type": "web_search_result", "url": "javascript:window.__pwned=1", "title": EVIL_TITLE,
             "encrypted_content": "E2", "page_age": None},
            {"type": "web_search_result", "url": "http://plain.example.com/a?b=1&c=<2>", "title": "Plain",
             "encrypted_content": "E3", "page_age": None}]},
        {"type": "server_tool_use", "id": "srvtoolu_code", "name": "code_execution",
         "input": {"code": "print(6*7)"}},
        {"type": "code_execution_tool_result", "tool_use_id": "srvtoolu_code", "content": {
            "type": "code_execution_result", "stdout": "42\n", "stderr": "<b>warning</b>", "return_code": 0,
            "content": []}},
        {"type": "text", "text": "The capital is "},
        {"type": "text", "text": "Paris", "citations": [_cite(WIKI, "Paris - Encyclopedia"),
                                                         _cite("javascript:window.__pwned=1", EVIL_TITLE)]},
        {"type": "text", "text": ".", "citations": [
            {"type": "char_location", "cited_text": "Paris", "document_index": 0, "document_title": "notes.txt",
             "start_char_index": 0, "end_char_index": 5},
            _cite(WIKI, "Paris - Encyclopedia")]},  # cited again: still one source
    ]})
    page.send("What is the capital of France?")

    def thinking_view() -> dict[str, Any]:
        return page.js("""
            const a = document.querySelectorAll('article.msg.assistant')[arguments[0]];
            const t = a && a.querySelector('.answer > details.thinking');
            return t ? {text: t.querySelector('.thinking-text').textContent, open: t.open,
                        summary: t.querySelector('summary').textContent,
                        answer: Array.from(a.querySelectorAll('.answer > .text')).map(x => x.textContent).join(''),
                        first: a.querySelector('.answer').firstElementChild === t} : {};""", 0)

    live = wait_for(lambda: (lambda t: t if t.get("text", "").startswith("The user asks") else None)(thinking_view()),
                    what="thinking to stream")
    assert live["open"] and live["answer"] == "" and live["first"], "live, open, above the (empty) answer"
    assert len(live["text"]) < len(THOUGHT) and live["summary"] == "Thinking…"
    answer = page.wait_answer(0, timeout=30)
    assert answer["text"] == "The capital is Paris.", "the thinking is never part of the answer"
    done = thinking_view()
    assert done["text"] == THOUGHT and done["open"] is False and done["summary"] == "Thinking"

    view = page.js("""
        const a = document.querySelectorAll('article.msg.assistant')[0];
        const links = (root) => Array.from(root.querySelectorAll('a')).map(l => ({
            href: l.getAttribute('href'), text: l.textContent, target: l.target, rel: l.rel}));
        return {
          tools: Array.from(a.querySelectorAll('details.tool')).map(t => ({
            cls: t.className, name: t.querySelector('.tool-name').textContent,
            badge: (t.querySelector('.tool-badge') || {}).textContent || null,
            state: t.querySelector('.tool-state').textContent, text: t.textContent,
            results: Array.from(t.querySelectorAll('.results li')).map(li => li.textContent), links: links(t)})),
          sources: Array.from(a.querySelectorAll('.sources li')).map(li => ({text: li.textContent,
                                                                         links: links(li)})),
          sourcesShown: !a.querySelector('.sources').hidden,
          anyJsHref: Array.from(document.querySelectorAll('a')).some(l => /^\\s*javascript:/i.test(l.href)),
          images: document.querySelectorAll('#log img, #log b').length,
          pwned: window.__pwned || null, violations: window.__violations};""")
    search, code = view["tools"]
    assert search["cls"] == "tool server" and search["name"] == "Tool: web_search"
    assert search["badge"] == "run by Anthropic" and search["state"] == "done: 3 results"
    assert search["results"] == ["Paris - Encyclopedia · 2 days ago", EVIL_TITLE, "Plain"]
    assert search["links"] == [
        {"href": WIKI, "text": "Paris - Encyclopedia", "target": "_blank", "rel": "noopener noreferrer"},
        {"href": "http://plain.example.com/a?b=1&c=%3C2%3E", "text": "Plain", "target": "_blank",
         "rel": "noopener noreferrer"}], "no link for a javascript: URL"
    assert code["badge"] == "run by Anthropic" and code["state"] == "done: exit 0"
    assert "stdout: 42" in code["text"] and "stderr: <b>warning</b>" in code["text"]
    assert view["sourcesShown"]
    assert [s["text"] for s in view["sources"]] == ["Paris - Encyclopedia", EVIL_TITLE, "notes.txt"]
    assert view["sources"][0]["links"] == [{"href": WIKI, "text": "Paris - Encyclopedia", "target": "_blank",
                                            "rel": "noopener noreferrer"}]
    assert view["sources"][1]["links"] == [] and view["sources"][2]["links"] == []
    assert not view["anyJsHref"] and view["images"] == 0 and view["pwned"] is None
    assert view["violations"] == [], "the page keeps to its Content-Security-Policy"

    # Refused, cut off, ended for an unknown reason: each says so.
    upstream.script({"text": "I can't help with that.", "stop_reason": "refusal",
                     "stop_details": {"type": "refusal", "category": "cyber", "explanation": "Looks like malware."}})
    page.send("Write malware")
    refused = page.wait_answer(1)
    assert "The model declined to answer this request (cyber). Looks like malware." in refused["notes"]
    upstream.script({"text": "a b c", "stop_reason": "max_tokens"})
    page.send("Go on and on")
    assert "The answer hit the token limit." in page.wait_answer(2)["notes"]
    upstream.script({"text": "Hmm.", "stop_reason": "a_brand_new_reason"})
    page.send("And now?")
    unknown = page.wait_answer(3)
    assert any("does not know (a_brand_new_reason)" in n for n in unknown["notes"]), unknown
    finishes = page.js("return Array.from(document.querySelectorAll('article.msg.assistant'))"
                       ".map(a => a.dataset.finish)")
    assert finishes == ["complete", "refused", "truncated", "unknown"]
    assert page.js("return window.__violations") == []
    page.js("document.querySelector('details.thinking').open = true")
    page.screenshot(SCREENSHOT.with_name("chat-page-thinking.png"))
