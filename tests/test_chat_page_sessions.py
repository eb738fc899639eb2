"""The chat page's conversations sidebar and Markdown answers, in real headless Chromium (as
tests/test_chat_page.py: Debian's chromium and chromium-driver, installed with apt-get when missing).

Against real servers (uvicorn, Redis) and the fake Anthropic: switching conversations (their
history rendered from GET /sessions/{id}), rename (PATCH), delete, paging with "More", the key
the page uses on its HTTP calls, a Markdown answer whose raw HTML must not run, and the
narrow-screen layout. Screenshots: test-artifacts/chat-page-sidebar.png, chat-page-markdown.png,
chat-page-narrow.png (a conversation on a phone-sized screen) and chat-page-narrow-list.png (its list open).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx

from server.static import PAGE_HEADERS

from .test_chat_page import SCREENSHOT, Page, page_server, wait_for

SIDEBAR_SHOT = SCREENSHOT.with_name("chat-page-sidebar.png")
MARKDOWN_SHOT = SCREENSHOT.with_name("chat-page-markdown.png")
NARROW_SHOT = SCREENSHOT.with_name("chat-page-narrow.png")
NARROW_LIST_SHOT = SCREENSHOT.with_name("chat-page-narrow-list.png")

FILLER = " ".join(["The rest of the answer streams on, word by word."] * 20)
MARKDOWN = (
    "## Plan\n\n"
    "Here is **bold** text and a [safe link](https://example.org/docs?a=1&b=2).\n\n"
    "1. first step\n2. second step\n\n"
    "- apples\n- pears\n- plums\n\n"
    "```python\ndef add(a, b):\n    return a + b  # <b>not bold</b>\n```\n\n"
    "<script>window.__xss = 'script'</script>\n\n"
    "Inline <img src=x onerror=\"window.__xss = 'img'\"> and <b onmouseover=\"window.__xss = 'b'\">raw</b>.\n\n"
    "[bad link](javascript:window.__xss='link') and ![a picture](https://example.org/p.png)\n\n"
    f"{FILLER}\n\nDone."
)
CODE = "def add(a, b):\n    return a + b  # <b>not bold</b>\n"


def keyed(start_server: Any) -> tuple[Any, str, dict[str, str]]:
    """A page server with API keys, and a key of this test's own: a principal whose conversations
    list holds only what this test made (the Redis database is shared by the tests)."""
    key = "page-" + secrets.token_hex(12)
    server = page_server(start_server, AGENT_API_KEYS=f"{key},other-{secrets.token_hex(12)}")
    return server, key, {"Authorization": f"Bearer {key}"}


def keyed_page(browser: Any, server: Any, key: str) -> Page:
    """The page, given the key at its prompt (it keeps it for the tab and sends it on every call)."""
    from selenium.webdriver.common.by import By

    page = Page.__new__(Page)  # (not Page(): it waits for a connection the key has yet to allow)
    page.d, page.server = browser, server
    browser.get(server.url + "/")
    wait_for(lambda: browser.find_element(By.ID, "auth").is_displayed(), what="the key prompt")
    browser.find_element(By.ID, "api-key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#auth button[type=submit]").click()
    wait_for(lambda: page.state().get("connected"), what="the connection with the key")
    return page


def sidebar(page: Page) -> list[dict[str, Any]]:
    return page.js("""
        return Array.from(document.querySelectorAll('#conversations li.conv')).map(li => ({
          id: li.dataset.sessionId, current: li.classList.contains('current'),
          title: (li.querySelector('.conv-title') || {}).textContent || null,
          meta: (li.querySelector('.conv-meta') || {}).textContent || null}));""")


def sidebar_ids(page: Page) -> list[str]:
    return [row["id"] for row in sidebar(page)]


def users(page: Page) -> list[str]:
    return page.js("return Array.from(document.querySelectorAll('article.msg.user .text')).map(t => t.textContent)")


def row_button(page: Page, session_id: str, cls: str) -> Any:
    from selenium.webdriver.common.by import By

    return page.d.find_element(By.CSS_SELECTOR, f'li.conv[data-session-id="{session_id}"] .{cls}')


def click_row(page: Page, session_id: str, cls: str) -> None:
    """Click a row's button (found again if a list refresh replaced the row meanwhile)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(5):
        try:
            row_button(page, session_id, cls).click()
            return
        except StaleElementReferenceException:
            if attempt == 4:
                raise
            time.sleep(0.1)


def open_conversation(page: Page, session_id: str) -> None:
    click_row(page, session_id, "conv-open")
    wait_for(lambda: (lambda s: s.get("connected") and not s.get("loading") and s.get("sessionId") == session_id)(
        page.state()), what=f"conversation {session_id} to open")


def listed(server_url: str, headers: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
    r = httpx.get(f"{server_url}/sessions", params=params, headers=headers or {}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def new_chat_by_keyboard(page: Page) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    (ActionChains(page.d).key_down(Keys.CONTROL).key_down(Keys.SHIFT).send_keys("o")
     .key_up(Keys.SHIFT).key_up(Keys.CONTROL).perform())


def test_sidebar_switch_rename_delete_and_more(browser, start_server, upstream):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server, key, auth = keyed(start_server)
    page = keyed_page(browser, server, key)
    page.js("window.__violations = []; document.addEventListener('securitypolicyviolation', "
            "(e) => window.__violations.push(e.violatedDirective));")
    wait_for(lambda: browser.find_element(By.ID, "no-conversations").is_displayed(), what="the empty list")

    # Conversation A: it shows up at once, titled after its first message, highlighted.
    upstream.script({"text": "Alpha answer."})
    page.send("First conversation about alpha")
    assert page.wait_answer(0)["text"] == "Alpha answer."
    alpha = page.state()["sessionId"]
    rows = wait_for(lambda: (lambda r: r if r and r[0]["id"] == alpha and "1 turn" in (r[0]["meta"] or "") else None)(
        sidebar(page)), what="conversation A in the list after its turn")
    assert rows[0]["title"] == "First conversation about alpha" and rows[0]["current"]

    # A new chat from the keyboard (Ctrl+Shift+O), then conversation B with a tool call.
    new_chat_by_keyboard(page)
    wait_for(lambda: (lambda s: s["connected"] and s["sessionId"] is None)(page.state()), what="a new chat")
    assert page.answers() == [] and not any(r["current"] for r in sidebar(page))
    upstream.script({"tool_use": [{"name": "calculator", "input": {"expression": "6*7"}}]},
                    {"text": "Beta: **42**."})
    page.send("Second conversation about beta")
    assert page.wait_answer(0)["text"] == "Beta: 42."
    beta = page.state()["sessionId"]
    assert beta != alpha
    wait_for(lambda: sidebar_ids(page)[:2] == [beta, alpha], what="B above A")
    assert [r["current"] for r in sidebar(page)[:2]] == [True, False]

    # Switch to A: its history as the live turn showed it, then one more turn there; A moves up.
    open_conversation(page, alpha)
    assert users(page) == ["First conversation about alpha"]
    history = page.answers()
    assert [a["text"] for a in history] == ["Alpha answer."]
    assert any("out tokens" in n for n in history[0]["notes"]), "usage per answer, from the turn records"
    assert [r["current"] for r in sidebar(page)[:2]] == [False, True]
    upstream.script({"text": "Alpha again."})
    page.send("More about alpha")
    assert page.wait_answer(1)["text"] == "Alpha again."
    assert page.state()["sessionId"] == alpha, "the same conversation, continued"
    assert httpx.get(f"{server.url}/sessions/{alpha}", headers=auth, timeout=10).json()["turns"] == 2
    wait_for(lambda: sidebar_ids(page)[:2] == [alpha, beta] and "2 turns" in (sidebar(page)[0]["meta"] or ""),
             what="A back on top after its turn")

    # Switch to B: the tool call and its result, the Markdown answer.
    open_conversation(page, beta)
    assert users(page) == ["Second conversation about beta"]
    b_view = page.answers()
    assert [a["text"] for a in b_view] == ["Beta: 42."] and len(b_view[0]["tools"]) == 1
    assert "Tool: calculator" in b_view[0]["tools"][0] and "result: 42" in b_view[0]["tools"][0]
    assert page.js("return document.querySelector('article.msg.assistant .md strong').textContent") == "42"

    # Rename A in place (Enter saves); the server has the user's title.
    click_row(page, alpha, "conv-rename")
    field = browser.find_element(By.CSS_SELECTOR, "li.conv .conv-edit input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("Renamed alpha" + Keys.ENTER)
    wait_for(lambda: any(r["id"] == alpha and r["title"] == "Renamed alpha" for r in sidebar(page)),
             what="the new title in the list")
    a_server = httpx.get(f"{server.url}/sessions/{alpha}", headers=auth, timeout=10).json()
    assert a_server["title"] == "Renamed alpha" and a_server["title_source"] == "user"
    # Esc cancels a rename without stopping anything or changing the title.
    click_row(page, beta, "conv-rename")
    browser.find_element(By.CSS_SELECTOR, "li.conv .conv-edit input").send_keys("zzz" + Keys.ESCAPE)
    wait_for(lambda: not browser.find_elements(By.CSS_SELECTOR, ".conv-edit"), what="the rename to close")
    assert [r["title"] for r in sidebar(page)] == ["Renamed alpha", "Second conversation about beta"]
    page.screenshot(SIDEBAR_SHOT)

    # A reload reopens the conversation being shown.
    page.reload_into(beta, "the page to reopen B after a reload")
    assert [a["text"] for a in page.answers()] == ["Beta: 42."]
    wait_for(lambda: (lambda r: [x["id"] for x in r] == [alpha, beta] and r[1]["current"])(sidebar(page)),
             what="the list, B highlighted, after the reload")
    page.js("window.__violations = []; document.addEventListener('securitypolicyviolation', "
            "(e) => window.__violations.push(e.violatedDirective));")

    # Delete B (the one shown), after confirming: gone from the list and the server; a new chat.
    click_row(page, beta, "conv-delete")
    assert beta in sidebar_ids(page), "nothing deleted before the confirmation"
    browser.find_element(By.CSS_SELECTOR, ".conv-confirm button.danger").click()
    wait_for(lambda: sidebar_ids(page) == [alpha], what="B to leave the list")
    assert httpx.get(f"{server.url}/sessions/{beta}", headers=auth, timeout=10).status_code == 404
    wait_for(lambda: (lambda s: s["connected"] and s["sessionId"] is None)(page.state()), what="a new chat")
    assert page.answers() == []

    # Paging: 21 more conversations; the list shows 20, "More" the rest, newest first, no repeats.
    made = [httpx.post(f"{server.url}/agent", json={"message": f"conversation {i}"}, headers=auth,
                       timeout=30).json()["session_id"] for i in range(21)]
    browser.refresh()
    page.js("window.__violations = []; document.addEventListener('securitypolicyviolation', "
            "(e) => window.__violations.push(e.violatedDirective));")
    wait_for(lambda: len(sidebar_ids(page)) == 20, what="the first page of the list")
    more = browser.find_element(By.ID, "more")
    assert more.is_displayed() and page.state()["moreCursor"]
    assert sidebar_ids(page) == list(reversed(made))[:20]
    more.click()
    wait_for(lambda: len(sidebar_ids(page)) == 22, what="the second page")
    assert sidebar_ids(page) == [*reversed(made), alpha]
    everything = listed(server.url, auth, limit=100)["sessions"]
    assert sidebar_ids(page) == [s["session_id"] for s in everything]
    assert not browser.find_element(By.ID, "more").is_displayed()
    assert page.js("return window.__violations") == []


def test_markdown_answer_is_rendered_safely(browser, start_server, upstream):
    server, key, auth = keyed(start_server)
    page = keyed_page(browser, server, key)
    page.js("window.__violations = []; document.addEventListener('securitypolicyviolation', "
            "(e) => window.__violations.push(e.violatedDirective));")
    upstream.script({"text": MARKDOWN, "pace_ms": 8})
    renders_before = page.state()["stats"]["markdownRenders"]
    page.send("Show me some Markdown")

    # Rendered while it streams: complete blocks (the list) are rendered once and kept.
    wait_for(lambda: page.js("""const a = document.querySelector('article.msg.assistant');
        return a && a.getAttribute('aria-busy') === 'true' && a.querySelectorAll('.md ul li').length === 3;"""),
             what="the list rendered while the answer streams")
    page.js("document.querySelector('article.msg.assistant .md ol').__kept = true")
    wait_for(lambda: page.js("return document.querySelector('article.msg.assistant .md pre') !== null"),
             what="the code block to stream in")
    assert page.js("""const a = document.querySelector('article.msg.assistant');
        return a.getAttribute('aria-busy') === 'true' && a.querySelector('.md ol').__kept === true"""), \
        "a finished block is not re-rendered while the answer goes on"
    answer = page.wait_answer(0, timeout=30)
    words = len(MARKDOWN.split())
    renders = page.state()["stats"]["markdownRenders"] - renders_before
    assert 1 < renders < words / 3, f"throttled: {renders} renders for {words} deltas"

    def check(where: str) -> dict[str, Any]:
        view = page.js("""
            const a = document.querySelector('article.msg.assistant .answer');
            const log = document.getElementById('log');
            return {
              h2: (a.querySelector('h2') || {}).textContent || null,
              strong: Array.from(a.querySelectorAll('strong')).map(x => x.textContent),
              ol: Array.from(a.querySelectorAll('ol > li')).map(x => x.textContent),
              ul: Array.from(a.querySelectorAll('ul > li')).map(x => x.textContent),
              code: Array.from(a.querySelectorAll('pre > code')).map(x => x.textContent),
              links: Array.from(a.querySelectorAll('a')).map(x => ({text: x.textContent,
                href: x.getAttribute('href'), target: x.getAttribute('target'), rel: x.getAttribute('rel')})),
              text: a.textContent,
              dangerous: log.querySelectorAll('script, img, iframe, b, [onerror], [onmouseover], [style]').length,
              xss: window.__xss === undefined ? null : String(window.__xss),
              violations: window.__violations || []};""")
        assert view["h2"] == "Plan", where
        assert view["strong"] == ["bold"], where
        assert view["ol"] == ["first step", "second step"], where
        assert view["ul"] == ["apples", "pears", "plums"], where
        assert view["code"] == [CODE], where
        assert view["links"] == [
            {"text": "safe link", "href": "https://example.org/docs?a=1&b=2", "target": "_blank",
             "rel": "noopener noreferrer"},
            {"text": "bad link", "href": None, "target": None, "rel": None},
            {"text": "a picture", "href": "https://example.org/p.png", "target": "_blank",
             "rel": "noopener noreferrer"}], where
        assert "<script>window.__xss = 'script'</script>" in view["text"], "raw HTML is shown as text"
        assert "<img src=x onerror=" in view["text"] and "raw</b>" in view["text"]
        assert view["dangerous"] == 0 and view["xss"] is None, (where, view)
        assert view["violations"] == [], (where, view["violations"])
        return view

    check("live")
    assert answer["text"].endswith("Done.") and any("out tokens" in n for n in answer["notes"])
    session_id = page.state()["sessionId"]
    stored = httpx.get(f"{server.url}/sessions/{session_id}", headers=auth, timeout=10).json()
    assert stored["messages"][-1]["content"][0]["text"] == MARKDOWN, "the model's text is stored as it was"
    page.screenshot(MARKDOWN_SHOT)

    # The same answer rendered from the history (a reload reopens the conversation).
    page.reload_into(session_id, "the conversation to reopen")
    page.js("window.__violations = []")  # (what the history render did is checked in the DOM and window.__xss)
    check("history")

    # The page and its assets: the vendored libraries are same-origin scripts; the CSP is unchanged.
    r = httpx.get(server.url + "/")
    assert r.headers["content-security-policy"] == PAGE_HEADERS["Content-Security-Policy"]
    for asset in ("vendor/marked.min.js", "vendor/purify.min.js", "markdown.js"):
        a = httpx.get(f"{server.url}/static/{asset}")
        assert a.status_code == 200 and "javascript" in a.headers["content-type"], asset
        assert f'src="static/{asset}"' in r.text


def test_http_calls_carry_the_key_and_list_only_ones_own(browser, start_server, upstream):
    """With AGENT_API_KEYS the page asks for a key, then uses it on its HTTP calls (the list and
    the history) as on its WebSocket: it lists that key's conversations only."""
    mine, theirs = "page-" + secrets.token_hex(12), "page-" + secrets.token_hex(12)
    server = page_server(start_server, AGENT_API_KEYS=f"{mine},{theirs}")
    own = httpx.post(f"{server.url}/agent", json={"message": "my own conversation"},
                     headers={"Authorization": f"Bearer {mine}"}, timeout=30).json()["session_id"]
    other = httpx.post(f"{server.url}/agent", json={"message": "somebody else's"},
                       headers={"Authorization": f"Bearer {theirs}"}, timeout=30).json()["session_id"]
    page = keyed_page(browser, server, mine)
    wait_for(lambda: sidebar_ids(page) == [own], what="the key's own conversation, and only it")
    assert other not in sidebar_ids(page)
    open_conversation(page, own)
    assert users(page) == ["my own conversation"] and page.answers()[0]["text"]


def test_narrow_screen_layout(browser, start_server, upstream):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server, key, _ = keyed(start_server)
    browser.set_window_size(420, 860)
    try:
        page = keyed_page(browser, server, key)
        sidebar_el = browser.find_element(By.ID, "sidebar")
        toggle = browser.find_element(By.ID, "sidebar-toggle")
        assert not sidebar_el.is_displayed() and toggle.is_displayed(), "the list hides behind a button"
        upstream.script({"text": "Short answer with a list:\n\n- one\n- two\n\n`inline code` too."})
        page.send("A question from a phone")
        assert page.wait_answer(0)["text"]
        upstream.script({"text": "Another one."})
        new_chat_by_keyboard(page)
        wait_for(lambda: (lambda s: s["connected"] and s["sessionId"] is None)(page.state()), what="a new chat")
        page.send("A second question")
        page.wait_answer(0)
        current = page.state()["sessionId"]
        wait_for(lambda: len(sidebar_ids(page)) == 2, what="both conversations listed")

        def open_list(what: str) -> None:
            """Open the list and wait until it has slid in (a row mid-slide cannot be clicked)."""
            toggle.click()
            wait_for(lambda: sidebar_el.is_displayed() and toggle.get_attribute("aria-expanded") == "true",
                     what=f"the list to open{what}")
            wait_for(lambda: page.js("return document.getElementById('sidebar').getBoundingClientRect().left") >= 0,
                     what=f"the list to slide in{what}")

        open_list("")
        width = page.js("return document.getElementById('sidebar').getBoundingClientRect().width")
        assert width <= 420 * 0.9, width
        page.screenshot(NARROW_LIST_SHOT, top=False)
        ActionChains(browser).send_keys(Keys.ESCAPE).perform()
        wait_for(lambda: not sidebar_el.is_displayed(), what="Esc to close the list")
        assert page.state()["sessionId"] == current and toggle.get_attribute("aria-expanded") == "false"

        # Picking a conversation closes the list and opens it.
        open_list(" again")
        first = sidebar_ids(page)[1]
        open_conversation(page, first)
        wait_for(lambda: not sidebar_el.is_displayed(), what="the list to close after picking")
        assert users(page) == ["A question from a phone"]
        assert page.js("return document.querySelectorAll('article.msg.assistant .md ul li').length") == 2
        page.screenshot(NARROW_SHOT)
    finally:
        browser.set_window_size(1000, 900)


def test_leaving_and_coming_back_follows_a_running_turn(browser, start_server, upstream):
    """Switching away while an answer streams leaves the turn running on the server; coming back
    shows it from its start and follows it to the end, each word once."""
    from selenium.webdriver.common.by import By

    server, key, auth = keyed(start_server)
    page = keyed_page(browser, server, key)
    full = " ".join(f"tok{i}" for i in range(60))
    page.send('Count slowly #fake{"tokens":60,"pace_ms":40}')
    wait_for(lambda: "tok5 " in page.answer(0).get("text", ""), what="the answer to start streaming")
    session_id = page.state()["sessionId"]
    browser.find_element(By.ID, "new-chat").click()
    wait_for(lambda: (lambda s: s["connected"] and s["sessionId"] is None)(page.state()), what="a new chat")
    assert page.answers() == []
    wait_for(lambda: session_id in sidebar_ids(page), what="the running conversation in the list")
    running = httpx.get(f"{server.url}/sessions/{session_id}", headers=auth, timeout=10).json()["running_turn_id"]
    assert running, "the turn goes on without the page"

    open_conversation(page, session_id)
    answer = page.wait_answer(0, timeout=30)
    assert answer["text"] == full, "the whole answer exactly once"
    assert not any("dropped" in n for n in answer["notes"]), "not reported as a lost connection"
    state = page.state()
    assert state["sessionId"] == session_id and not state["running"] and state["stats"]["resumes"] == 1
    stored = httpx.get(f"{server.url}/sessions/{session_id}", headers=auth, timeout=10).json()
    assert stored["running_turn_id"] is None and stored["turns"] == 1
