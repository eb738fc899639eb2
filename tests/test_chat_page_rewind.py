"""The chat page's Edit and Regenerate buttons, and coming back to a running turn, in real
headless Chromium (as tests/test_chat_page.py: Debian's chromium and chromium-driver,
installed with apt-get when missing).

Against real servers (uvicorn, Redis) and the fake Anthropic: regenerate the last answer
(`{"type":"message","replace_turn":T}`), edit the first question of two
(`{"type":"message","message":…,"replace_turn":T}`), a regenerate that fails (the server
rewound nothing: the page shows the stored conversation again), and a reload while a turn
runs (its question, from `turn_start.user_text`, then its answer resuming), also while a
regenerate runs (what it replaces, `turn_start.rewound_turns`, leaves the page).
A Markdown answer's raw HTML is covered in tests/test_chat_page_sessions.py.
Screenshots: test-artifacts/chat-page-regenerate.png and chat-page-edit.png (the editor open).
"""

from __future__ import annotations

from typing import Any

import httpx

from .test_chat_page import FULL_60, SCREENSHOT, Page, wait_for
from .test_chat_page_sessions import keyed, keyed_page

REGENERATE_SHOT = SCREENSHOT.with_name("chat-page-regenerate.png")
EDIT_SHOT = SCREENSHOT.with_name("chat-page-edit.png")

NEW_SECOND = " ".join(["A different second answer, streamed slowly word by word."] * 3)
WATCH_CSP = ("window.__violations = []; document.addEventListener('securitypolicyviolation', "
             "(e) => window.__violations.push(e.violatedDirective));")


def view(page: Page) -> list[dict[str, Any]]:
    """The log's messages in order: role, text, turn id and action buttons."""
    return page.js("""
        return Array.from(document.querySelectorAll('#log article.msg')).map(a => ({
          role: a.classList.contains('user') ? 'user' : 'assistant',
          text: a.classList.contains('user') ? ((a.querySelector(':scope > .text') || {}).textContent || '')
            : Array.from(a.querySelectorAll('.answer > .text')).map(t => t.textContent).join(''),
          turn: a.dataset.turnId || null, state: a.dataset.state || null,
          buttons: Array.from(a.querySelectorAll('.msg-actions button')).map(b => ({
            text: b.textContent, label: b.getAttribute('aria-label'), disabled: b.disabled}))}));""")


def texts(page: Page) -> list[tuple[str, str]]:
    return [(m["role"], m["text"]) for m in view(page)]


def open_page(browser: Any, start_server: Any) -> tuple[Page, Any]:
    """A page server with an API key of this test's own (its list holds only this test's
    conversations), and the page, given that key; the server's `auth` headers set on it."""
    server, key, auth = keyed(start_server)
    server.auth = auth
    return keyed_page(browser, server, key), server


def stored(server: Any, session_id: str) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/sessions/{session_id}", headers=server.auth, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def stored_texts(session: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of each stored message (text blocks joined)."""
    out = []
    for m in session["messages"]:
        content = m["content"]
        text = content if isinstance(content, str) else "".join(
            b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
        out.append((m["role"], text))
    return out


def sent_texts(request: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of the messages a request to the fake carried."""
    return stored_texts({"messages": request["body"]["messages"]})


def button(page: Page, role: str, i: int, cls: str) -> Any:
    from selenium.webdriver.common.by import By

    article = page.d.find_elements(By.CSS_SELECTOR, f"#log article.msg.{role}")[i]
    return article.find_element(By.CSS_SELECTOR, f".msg-actions .{cls}")


def press(page: Page, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(page.d).send_keys(*keys).perform()


def active(page: Page) -> dict[str, Any]:
    return page.js("""const a = document.activeElement;
        return {tag: a.tagName, cls: a.className, label: a.getAttribute('aria-label'),
                article: Array.from(document.querySelectorAll('#log article.msg')).indexOf(a.closest('article'))};""")


def two_turns(page: Page, upstream: Any, first: tuple[str, str], second: tuple[str, str]) -> str:
    """A conversation of two finished turns; its session id."""
    for i, (question, answer) in enumerate((first, second)):
        upstream.script({"text": answer})
        page.send(question)
        assert page.wait_answer(i)["text"] == answer
    return page.state()["sessionId"]


def test_regenerate_the_last_answer(browser, start_server, upstream):
    from selenium.webdriver.common.keys import Keys

    page, server = open_page(browser, start_server)
    page.js(WATCH_CSP)
    session_id = two_turns(page, upstream, ("What is one?", "First answer."), ("And two?", "Second answer."))
    before = stored(server, session_id)
    old_turns = [r["turn_id"] for r in before["turn_records"]]

    # Every question has Edit, every answer Regenerate, labelled, tagged with its turn.
    shown = view(page)
    assert [(m["role"], m["turn"]) for m in shown] == [
        ("user", old_turns[0]), ("assistant", old_turns[0]), ("user", old_turns[1]), ("assistant", old_turns[1])]
    assert [[(b["text"], b["label"], b["disabled"]) for b in m["buttons"]] for m in shown] == [
        [("Edit", "Edit this message", False)], [("Regenerate", "Regenerate this answer", False)]] * 2
    assert all(any("out tokens" in n for n in a["notes"]) for a in page.answers()), "usage per answer"

    # By keyboard: Tab from the second question's Edit reaches its answer's Regenerate; Enter.
    upstream.script({"text": NEW_SECOND, "pace_ms": 40})
    requests_before = len(upstream.requests())
    page.js("arguments[0].focus()", button(page, "user", 1, "edit"))
    press(page, Keys.TAB)
    assert active(page) == {"tag": "BUTTON", "cls": "secondary regenerate", "label": "Regenerate this answer",
                            "article": 3}
    press(page, Keys.ENTER)

    # At once: the old answer is gone, the question stays, the new answer streams; every
    # Edit / Regenerate button is disabled while it runs.
    streaming = wait_for(lambda: (lambda v: v if len(v) == 4 and v[3]["text"] and v[3]["state"] is None else None)(
        view(page)), what="the new answer to stream")
    assert [m["text"] for m in streaming[:3]] == ["What is one?", "First answer.", "And two?"]
    assert NEW_SECOND.startswith(streaming[3]["text"])
    assert "Second answer." not in page.js("return document.getElementById('log').textContent")
    assert all(b["disabled"] for m in streaming for b in m["buttons"]), streaming
    assert page.state()["rewinding"] == old_turns[1]
    answer = page.wait_answer(1, timeout=30)
    assert answer["text"] == NEW_SECOND and any("out tokens" in n for n in answer["notes"])
    assert texts(page) == [("user", "What is one?"), ("assistant", "First answer."), ("user", "And two?"),
                           ("assistant", NEW_SECOND)]

    # The server agrees, and the model never saw the old answer.
    after = stored(server, session_id)
    assert stored_texts(after) == texts(page)
    new_turns = [r["turn_id"] for r in after["turn_records"]]
    assert len(new_turns) == 2 and new_turns[0] == old_turns[0] and new_turns[1] != old_turns[1]
    sent = upstream.requests()[requests_before:]
    assert len(sent) == 1
    assert sent_texts(sent[0]) == [("user", "What is one?"), ("assistant", "First answer."), ("user", "And two?")]
    assert "Second answer." not in str(sent[0]["body"])
    final = view(page)
    assert [m["turn"] for m in final] == [new_turns[0], new_turns[0], new_turns[1], new_turns[1]]
    assert not any(b["disabled"] for m in final for b in m["buttons"])
    assert active(page)["tag"] == "TEXTAREA", "the focus goes back to the message box"
    assert page.js("return window.__violations") == [], "the strict CSP holds"
    page.screenshot(REGENERATE_SHOT)

    # A reload shows the same conversation from the history, turn ids included.
    page.reload_into(session_id, "the conversation to reopen")
    assert texts(page) == stored_texts(after)
    assert [m["turn"] for m in view(page)] == [new_turns[0], new_turns[0], new_turns[1], new_turns[1]]


def test_edit_the_first_message(browser, start_server, upstream):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page, server = open_page(browser, start_server)
    page.js(WATCH_CSP)
    session_id = two_turns(page, upstream, ("Tell me about cats", "Cats purr."), ("And dogs?", "Dogs bark."))
    requests_before = len(upstream.requests())

    # The inline editor: prefilled, focused; Escape cancels (nothing sent, nothing stopped).
    button(page, "user", 0, "edit").click()
    field = browser.find_element(By.CSS_SELECTOR, "article.msg.user .msg-edit textarea")
    assert field.get_attribute("value") == "Tell me about cats"
    assert active(page)["tag"] == "TEXTAREA" and active(page)["article"] == 0
    assert [b.text for b in browser.find_elements(By.CSS_SELECTOR, ".msg-edit button")] == ["Save", "Cancel"]
    field.send_keys(" and more")
    press(page, Keys.ESCAPE)
    wait_for(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg-edit"), what="Escape to close the editor")
    assert texts(page)[0] == ("user", "Tell me about cats") and len(upstream.requests()) == requests_before
    assert active(page) == {"tag": "BUTTON", "cls": "secondary edit", "label": "Edit this message", "article": 0}

    # Edit again (Enter on the focused Edit button), a new text, Shift+Enter a new line, Enter saves.
    press(page, Keys.ENTER)
    field = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "article.msg.user .msg-edit textarea"),
                     what="the editor")[0]
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("Tell me about owls")
    field.send_keys(Keys.SHIFT, Keys.ENTER)
    field.send_keys("briefly")
    page.screenshot(EDIT_SHOT)
    edited = "Tell me about owls\nbriefly"
    assert field.get_attribute("value") == edited
    upstream.script({"text": "Owls hoot at night.", "pace_ms": 30})
    field.send_keys(Keys.ENTER)

    # The edited question first, then its answer; the second turn is gone.
    answer = page.wait_answer(0, timeout=30)
    assert answer["text"] == "Owls hoot at night."
    assert texts(page) == [("user", edited), ("assistant", "Owls hoot at night.")]
    after = stored(server, session_id)
    assert stored_texts(after) == texts(page) and len(after["turn_records"]) == 1
    sent = upstream.requests()[requests_before:]
    assert len(sent) == 1 and sent_texts(sent[0]) == [("user", edited)], "only the edited question"
    final = view(page)
    assert final[0]["turn"] == final[1]["turn"] == after["turn_records"][0]["turn_id"]
    assert [b["text"] for m in final for b in m["buttons"]] == ["Edit", "Regenerate"]
    assert page.js("return window.__violations") == []
    page.reload_into(session_id, "the conversation to reopen")
    assert texts(page) == [("user", edited), ("assistant", "Owls hoot at night.")]


def test_a_failed_regenerate_leaves_the_old_answer(browser, start_server, upstream):
    page, server = open_page(browser, start_server)
    page.js(WATCH_CSP)
    upstream.script({"text": "The old answer."})
    page.send("A question")
    page.wait_answer(0)
    session_id = page.state()["sessionId"]
    before = stored(server, session_id)

    # The model call fails: the server rewinds nothing; the page shows the stored conversation.
    upstream.script({"status": 400, "message": "Scripted failure"})
    button(page, "assistant", 0, "regenerate").click()
    note = wait_for(lambda: page.js("return (document.querySelector('#log .rewind-note') || {}).textContent"),
                    what="the page to show the conversation as stored")
    assert note.startswith("Not replaced:") and "bad_request" in note, note
    state = page.state()
    assert not state["running"] and not state["syncing"] and state["rewinding"] is None
    assert texts(page) == [("user", "A question"), ("assistant", "The old answer.")]
    after = stored(server, session_id)
    assert stored_texts(after) == stored_texts(before)
    old_turn = before["turn_records"][0]["turn_id"]
    assert [r["turn_id"] for r in after["turn_records"] if r["messages"]] == [old_turn]
    assert [m["turn"] for m in view(page)] == [old_turn, old_turn]
    assert not any(b["disabled"] for m in view(page) for b in m["buttons"])

    # Stopped before any answer came: nothing rewound either, the old answer is shown again.
    from selenium.webdriver.common.by import By

    upstream.script({"text": "Too late.", "ttft_ms": 5000})
    failed_turn = page.state()["turnId"]
    button(page, "assistant", 0, "regenerate").click()
    wait_for(lambda: page.state()["turnId"] not in (None, failed_turn), what="the regenerate's turn to start")
    assert texts(page) == [("user", "A question"), ("assistant", "")]
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: (lambda s: not s["running"] and not s["syncing"])(page.state())
             and texts(page) == [("user", "A question"), ("assistant", "The old answer.")], 15,
             "the stored conversation after the stop")
    assert stored_texts(stored(server, session_id)) == stored_texts(before)
    assert [m["turn"] for m in view(page)] == [old_turn, old_turn]

    # The buttons work again after the re-render.
    upstream.script({"text": "A better answer."})
    button(page, "assistant", 0, "regenerate").click()
    assert page.wait_answer(0)["text"] == "A better answer."
    assert texts(page) == [("user", "A question"), ("assistant", "A better answer.")]
    assert stored_texts(stored(server, session_id)) == texts(page)

    # Another client edits that turn meanwhile: the page's turn id is stale, the server says
    # turn_not_found (before any turn starts), and the page shows what is stored now.
    upstream.script({"text": "Answer from elsewhere."})
    r = httpx.post(f"{server.url}/agent", headers=server.auth, timeout=30, json={
        "session_id": session_id, "replace_turn": view(page)[1]["turn"], "message": "Changed elsewhere"})
    assert r.status_code == 200, r.text
    button(page, "assistant", 0, "regenerate").click()
    note = wait_for(lambda: page.js("return (document.querySelector('#log .rewind-note') || {}).textContent"),
                    what="the page to show the conversation as stored")
    assert "turn_not_found" in note, note
    assert texts(page) == [("user", "Changed elsewhere"), ("assistant", "Answer from elsewhere.")]
    assert page.js("return window.__violations") == []


def test_reload_during_a_running_turn_shows_its_question(browser, start_server, upstream):
    page, server = open_page(browser, start_server)
    upstream.script({"text": "First."})
    page.send("Hello")
    page.wait_answer(0)
    session_id = page.state()["sessionId"]

    # A slow second turn; the page is reloaded while it streams.
    question = 'Count slowly #fake{"tokens":60,"pace_ms":40}'
    page.send(question)
    wait_for(lambda: "tok5 " in page.answer(1).get("text", ""), what="the answer to start streaming")
    page.reload_into(session_id, "the page to reopen the conversation")
    shown = wait_for(lambda: (lambda v: v if len(v) == 4 else None)(view(page)), what="the running turn's question")
    assert [(m["role"], m["text"]) for m in shown[:3]] == [("user", "Hello"), ("assistant", "First."),
                                                           ("user", question)]
    running = stored(server, session_id)["running_turn_id"]
    assert running and shown[2]["turn"] == running, "the question belongs to the running turn"
    answer = page.wait_answer(1, timeout=30)
    assert answer["text"] == FULL_60, "the whole answer exactly once"
    assert texts(page) == [("user", "Hello"), ("assistant", "First."), ("user", question), ("assistant", FULL_60)]
    assert texts(page) == stored_texts(stored(server, session_id))

    # Reloaded while a regenerate runs: the answer it replaces leaves the page, the question shows once.
    upstream.script({"text": NEW_SECOND, "pace_ms": 60})
    button(page, "assistant", 1, "regenerate").click()
    wait_for(lambda: len(page.answer(1).get("text", "")) > 20, what="the new answer to start streaming")
    page.reload_into(session_id, "the page to reopen the conversation")
    expected = [("user", "Hello"), ("assistant", "First."), ("user", question), ("assistant", NEW_SECOND)]
    wait_for(lambda: texts(page) == expected and page.answer(1).get("state") == "done", 30,
             "the new answer alone, finished")
    assert texts(page) == stored_texts(stored(server, session_id))
    assert page.state()["stats"]["resumes"] == 1
