// The built-in chat page: one WebSocket to /agent/ws, no build step. Answers are Markdown,
// rendered by markdown.js (vendored marked + DOMPurify); the sidebar lists the caller's
// conversations (GET /sessions) to switch, rename (PATCH) and delete them.
//
// An answer shows, in the order they stream: the model's thinking (a folding "Thinking"
// section, never mixed into the answer), its text, tool calls (those the API runs itself,
// such as web search, marked "run by Anthropic"), and under it the sources its text cites.
// A call that needs the user's approval gets Approve / Deny buttons (a `tool_approval` frame
// on the socket); the decision, whoever made it, is shown on the call. A call that another
// client runs (a client tool; this page declares none) shows as waiting for that client.
// Tool text is only ever set as text; the answer's Markdown goes through the sanitiser, and raw
// HTML in it is shown as text. Links are http(s) only, opened in a new tab.
//
// Reconnect-and-resume: every event carries `id` = "<turn_id>:<seq>". The page remembers the
// session, the turn it is showing and the last seq it applied. When the socket drops, it
// reconnects to /agent/ws?session_id=… and sends {"type":"resume", turn_id, last_event_id};
// the server replays what came after, and anything at or below the last seq is ignored, so
// no text is ever shown twice. A message sent just before a drop is sent again with the same
// `message_id`, which the server treats as the same request (it joins the turn).
//
// Edit and regenerate: a question has an Edit button (an inline editor: Enter saves, Escape
// cancels), an answer a Regenerate button; both send a message frame with `replace_turn` (see
// "edit and regenerate" below). Coming back to a running turn (a reload, or opening its
// conversation again) shows its question from its turn_start (`user_text`) before its answer.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const logEl = $("log"), input = $("input"), form = $("composer");
  const sendBtn = $("send"), stopBtn = $("stop"), statusEl = $("status");

  const WATCHDOG_MS = 45000;  // the server pings every 20 s: silence this long means a dead link
  const state = {
    ws: null,
    sessionId: null,
    turnId: null,        // the turn being shown
    lastSeq: 0,          // the last event of that turn applied to the page
    running: false,      // from sending a message until its turn's terminal event
    pending: null,       // the message frame, until its turn_start arrives
    attempt: 0,          // reconnect attempts since the last successful open
    timer: null,
    lastFrameAt: 0,
    connecting: false,
    resumeFrom: null,   // fetching a ticket before opening the socket
    failedOpens: 0,      // sockets that closed before opening, in a row
    apiKey: sessionStorage.getItem("agent.apiKey") || "",
    view: null,          // the assistant message being streamed
    question: null,      // the question of that turn (null: not shown yet, e.g. a turn found running)
    rewinding: null,     // the turn being replaced by the running turn (edit / regenerate)
    syncing: false,      // reloading the conversation after a replacing turn stored nothing
    gen: 0,              // bumped when the page leaves a conversation (a pending connect then restarts)
    quietResume: false,  // resuming a turn found running on opening a conversation (not a drop)
    openToken: 0,        // the conversation being opened (a slower, older open is dropped)
    stats: { connects: 0, drops: 0, resumes: 0, duplicates: 0, resent: 0 },
  };

  // -- rendering ------------------------------------------------------------------------
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A labelled group of two buttons (a decision: approve / deny, delete / cancel).
  function choice(cls, label, [yesText, yesCls], [noText, noCls]) {
    const box = el("div", cls);
    box.setAttribute("role", "group");
    box.setAttribute("aria-label", label);
    const yes = el("button", yesCls, yesText);
    const no = el("button", noCls, noText);
    yes.type = no.type = "button";
    return [box, yes, no];
  }

  let scrollQueued = false;
  function scrollDown() {
    const nearBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 120;
    if (!nearBottom || scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => { scrollQueued = false; window.scrollTo(0, document.body.scrollHeight); });
  }

  // A message of the log (`before`: inserted there, else at the end).
  function addMessage(role, before = null) {
    const empty = $("empty");
    if (empty) empty.remove();
    const msg = el("article", "msg " + role);
    msg.append(el("div", "who", role === "user" ? "You" : "Agent"));
    logEl.insertBefore(msg, before);
    return msg;
  }

  function showUser(text, before = null) {
    const msg = addMessage("user", before);
    msg.append(el("div", "text", text));
    scrollDown();
    return msg;
  }

  // Links to what the model or a tool named: http(s) only (markdown.js's check), a new tab
  // without an opener or referrer, the text always as text (never markup).
  const safeHref = window.AgentMarkdown.safeHref;

  function link(url, text, cls) {
    const href = safeHref(url);
    const label = typeof text === "string" && text.trim() ? text : String(url ?? "");
    if (!href) return el("span", cls, label);
    const a = el("a", cls, label);
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    return a;
  }

  function clip(text, n) {
    const s = String(text).replace(/\s+/g, " ").trim();
    return s.length > n ? s.slice(0, n - 1) + "…" : s;
  }

  // What a citation points at: [key, label, href?] (one source entry per distinct key), or null.
  function citedSource(c) {
    if (!c || typeof c !== "object") return null;
    if (typeof c.url === "string" && c.url) return ["url:" + c.url, c.title || c.url, c.url];
    if (c.type === "search_result_location" && typeof c.source === "string" && c.source) {
      return safeHref(c.source) ? ["url:" + c.source, c.title || c.source, c.source]
        : [`search:${c.search_result_index}:${c.source}`, c.title || c.source, null];
    }
    if (["char_location", "page_location", "content_block_location"].includes(c.type) &&
        Number.isInteger(c.document_index)) {
      return [`doc:${c.document_index}`, c.document_title || `Document ${c.document_index + 1}`, null];
    }
    return null;
  }

  const SERVER_TOOL_LABEL = "run by Anthropic";
  const REDACTED = "\n[Part of the reasoning was encrypted for safety.]\n";

  class AnswerView {
    constructor() {
      this.root = addMessage("assistant");
      this.root.setAttribute("aria-busy", "true");
      this.body = el("div", "answer");
      this.sources = el("section", "sources");
      this.sources.hidden = true;
      this.sources.setAttribute("aria-label", "Sources");
      this.sources.append(el("div", "sources-title", "Sources"), el("ol"));
      this.root.append(this.body, this.sources);
      this.segment = null;  // the text node being appended to
      this.thinking = null; // the thinking section being streamed
      this.tools = new Map();
      this.cited = new Map();
      this.text = "";
    }
    appendThinking(text) {
      if (!this.thinking) {
        const box = el("details", "thinking");
        box.open = true;  // streamed live; folded once the model moves on
        const summary = el("summary", null, "Thinking…");
        const div = el("div", "thinking-text");
        const node = document.createTextNode("");
        div.append(node);
        box.append(summary, div);
        this.closeSegment();  // text after the thinking starts a new paragraph
        this.body.append(box);
        this.thinking = { box, summary, node };
      }
      this.thinking.node.appendData(text);
    }
    endThinking() {
      if (!this.thinking) return;
      this.thinking.summary.textContent = "Thinking";
      this.thinking.box.open = false;
      this.thinking = null;
    }
    appendText(text) {
      if (!this.segment) {
        const div = el("div", "text md");
        this.segment = new window.AgentMarkdown.Segment(div);
        this.body.append(div);
      }
      this.segment.append(text);
      this.text += text;
    }
    // The text run is over (a tool call, thinking or the end follows): its final render.
    closeSegment() {
      if (this.segment) this.segment.finish();
      this.segment = null;
    }
    tool(id, name, server) {
      let t = this.tools.get(id);
      if (!t) {
        const box = el("details", server ? "tool server" : "tool");
        const summary = el("summary");
        summary.append(el("span", "tool-name", "Tool: " + name));
        if (server) summary.append(el("span", "tool-badge", SERVER_TOOL_LABEL));
        summary.append(el("span", "tool-state", "running…"));
        box.append(summary);
        t = { box, state: summary.lastChild, input: null, output: null, server: !!server, decision: null };
        this.tools.set(id, t);
        this.closeSegment();  // text after a tool call starts a new paragraph
        this.body.append(box);
      }
      return t;
    }
    toolInput(ev) {
      const t = this.tool(ev.tool_use_id, ev.name, ev.server);
      if (!t.input) { t.input = el("pre", "input"); t.box.append(t.input); }
      t.input.textContent = "input: " + JSON.stringify(ev.input, null, 2);
      if (ev.valid === false) t.state.textContent = "invalid input: " + (ev.error || "");
    }
    // The turn waits for the user's decision on this call: Approve / Deny (once; a resume
    // replays the request, and a decision already shown is not asked again).
    approvalRequest(ev) {
      const t = this.tool(ev.tool_use_id, ev.name, false);
      if (t.decision) return;
      t.box.open = true;
      t.box.classList.add("pending");
      t.state.textContent = "waiting for your approval";
      const [bar, approve, deny] = choice("approval", "Approve or deny this tool call",
                                          ["Approve", "approve"], ["Deny", "deny secondary"]);
      const decide = (approved) => {
        approve.disabled = deny.disabled = true;
        t.state.textContent = approved ? "approving…" : "denying…";
        if (!send({ type: "tool_approval", tool_use_id: ev.tool_use_id, approved })) {
          approve.disabled = deny.disabled = false;  // (reconnecting: the decision was not sent)
          t.state.textContent = "not connected: decide again in a moment";
        }
      };
      approve.addEventListener("click", () => decide(true));
      deny.addEventListener("click", () => decide(false));
      bar.append(approve, deny);
      t.box.append(bar);
      t.decision = bar;
      approve.focus({ preventScroll: true });
    }
    clientCall(ev) {
      const t = this.tool(ev.tool_use_id, ev.name, false);
      t.box.classList.add("pending");
      t.state.textContent = "waiting for the client that runs it";
    }
    // The decision on an approval (from this page or any other client, or the timeout).
    approval(ev) {
      const t = this.tool(ev.tool_use_id, ev.name || "tool", false);
      if (t.decision && t.decision.classList.contains("approval")) t.decision.remove();
      t.box.classList.remove("pending");
      const text = ev.approved ? "Approved" : ev.timed_out ? "Denied: no decision in time" :
        "Denied" + (typeof ev.reason === "string" && ev.reason ? ": " + ev.reason : "");
      t.decision = el("p", ev.approved ? "decision approved" : "decision denied", text);
      t.box.append(t.decision);
      t.state.textContent = ev.approved ? "approved, running…" : "denied";
    }
    toolResult(ev) {
      const t = this.tool(ev.tool_use_id, ev.name, ev.server);
      t.box.classList.remove("pending");
      if (t.output) t.output.remove();
      const value = ev.is_error ? ev.error : ev.output;
      const shown = ev.server ? this.serverOutput(ev, value) : null;
      if (shown) {
        t.output = shown.node;
        t.state.textContent = shown.state;
      } else {
        t.output = el("pre", "output", (ev.is_error ? "error: " : "result: ") +
                      (typeof value === "string" ? value : JSON.stringify(value, null, 2)));
        t.state.textContent = (ev.is_error ? "failed: " : "done: ") +
          clip(typeof value === "string" ? value : JSON.stringify(value), 60);
      }
      t.box.append(t.output);
      t.box.classList.toggle("failed", !!ev.is_error);
      if (t.decision && t.decision.classList.contains("denied")) t.state.textContent = "denied";
    }
    // A server tool's result, readable: web search results as links, code execution's output...
    // null: shown as JSON, as a client tool's.
    serverOutput(ev, value) {
      if (ev.is_error) {
        const code = value && typeof value === "object" ? value.error_code : null;
        return { node: el("pre", "output", "error: " + (code || JSON.stringify(value))),
                 state: "failed: " + clip(code || JSON.stringify(value), 60) };
      }
      if (Array.isArray(value) && value.every((r) => r && typeof r === "object" && "url" in r)) {
        const list = el("ul", "results");
        for (const r of value) {
          const item = el("li");
          item.append(link(r.url, r.title || r.url));
          if (typeof r.page_age === "string" && r.page_age) item.append(el("span", "age", " · " + r.page_age));
          list.append(item);
        }
        return { node: list, state: `done: ${value.length} result${value.length === 1 ? "" : "s"}` };
      }
      if (value && typeof value === "object" && ("stdout" in value || "stderr" in value ||
                                                  "encrypted_stdout" in value)) {
        const box = el("div", "output");
        const stdout = typeof value.stdout === "string" ? value.stdout
          : ("encrypted_stdout" in value ? "(encrypted)" : "");
        box.append(el("pre", "stdout", "stdout: " + stdout));
        if (value.stderr) box.append(el("pre", "stderr", "stderr: " + value.stderr));
        const code = Number.isInteger(value.return_code) ? value.return_code : null;
        return { node: box, state: code === null ? "done" : `done: exit ${code}` };
      }
      if (value && typeof value === "object" && value.type === "web_fetch_result") {
        const title = value.content && typeof value.content.title === "string" ? value.content.title : "";
        const box = el("div", "output");
        box.append(link(value.url, title || value.url));
        return { node: box, state: "done: fetched" };
      }
      return null;
    }
    cite(citation) {
      const found = citedSource(citation);
      if (!found || this.cited.has(found[0])) return;
      const [key, label, href] = found;
      this.cited.set(key, this.cited.size + 1);
      const item = el("li");
      const entry = href ? link(href, label, "source") : el("span", "source document", label);
      if (typeof citation.cited_text === "string" && citation.cited_text) {
        entry.title = clip(citation.cited_text, 300);  // (a property: text, not markup)
      }
      item.append(entry);
      this.sources.lastChild.append(item);
      this.sources.hidden = false;
    }
    // A stored assistant message (GET /sessions/{id}), shown as the live events would show it.
    replay(blocks) {
      for (const b of blocks) {
        if (!b || typeof b !== "object") continue;
        if (b.type !== "thinking" && b.type !== "redacted_thinking") this.endThinking();
        if (b.type === "text") {
          this.appendText(String(b.text ?? ""));
          for (const c of Array.isArray(b.citations) ? b.citations : []) this.cite(c);
        } else if (b.type === "thinking") {
          this.appendThinking(String(b.thinking ?? ""));
        } else if (b.type === "redacted_thinking") {
          this.appendThinking(REDACTED);
        } else if (b.type === "tool_use" || b.type === "server_tool_use") {
          const server = b.type === "server_tool_use";
          this.toolInput({ tool_use_id: b.id, name: b.name, server, input: b.input });
        } else if (typeof b.type === "string" && b.type.endsWith("_tool_result")) {
          const content = b.content;
          const isError = !!content && typeof content === "object" && !Array.isArray(content) &&
            String(content.type || "").endsWith("_error");
          const known = this.tools.has(b.tool_use_id);
          this.toolResult({ tool_use_id: b.tool_use_id, name: known ? undefined : b.type, server: true,
                            is_error: isError, [isError ? "error" : "output"]: content });
        }
      }
    }
    // A client tool's stored result (a tool_result block of the next user message).
    replayResult(b) {
      const c = b.content;
      const text = typeof c === "string" ? c : Array.isArray(c)
        ? c.map((x) => (x && x.type === "text" ? x.text : JSON.stringify(x))).join("\n") : JSON.stringify(c ?? "");
      const t = this.tools.get(b.tool_use_id);
      this.toolResult({ tool_use_id: b.tool_use_id, name: t ? undefined : "tool", server: false,
                        is_error: !!b.is_error, [b.is_error ? "error" : "output"]: text });
    }
    note(text, cls = "notice") {
      this.root.append(el("p", cls, text));
    }
    finish(ev) {
      this.endThinking();
      this.closeSegment();
      this.root.setAttribute("aria-busy", "false");
      this.root.dataset.state = ev.type === "turn_end" ? (ev.cancelled ? "cancelled" : "done") : "error";
      if (ev.type === "turn_end") {
        const finish = ev.finish || (ev.cancelled ? "cancelled" : ev.truncated ? "truncated"
          : ev.stop_reason === "refusal" ? "refused" : "complete");
        this.root.dataset.finish = finish;
        if (finish === "cancelled") this.note("Stopped.");
        else if (finish === "truncated") {
          this.note(ev.stop_reason === "model_context_window_exceeded"
            ? "The answer was cut off: the conversation no longer fits the model's context window."
            : "The answer hit the token limit.", "notice warn");
        } else if (finish === "refused") {
          const d = ev.stop_details && typeof ev.stop_details === "object" ? ev.stop_details : {};
          let text = "The model declined to answer this request";
          if (typeof d.category === "string" && d.category) text += ` (${d.category.replace(/_/g, " ")})`;
          text += ".";
          if (typeof d.explanation === "string" && d.explanation) text += " " + d.explanation;
          this.note(text, "notice warn");
        } else if (finish === "unknown") {
          this.note(`The answer ended for a reason this page does not know (${ev.stop_reason || "no reason"}).`,
                    "notice warn");
        }
        const u = ev.usage || {};
        const parts = [`${u.input_tokens || 0} in / ${u.output_tokens || 0} out tokens`];
        if (u.cache_read_input_tokens) parts.push(`${u.cache_read_input_tokens} cached`);
        const searches = u.server_tool_use && u.server_tool_use.web_search_requests;
        if (searches) parts.push(`${searches} web search${searches === 1 ? "" : "es"}`);
        if (typeof ev.estimated_cost_usd === "number") parts.push(`$${ev.estimated_cost_usd.toFixed(4)}`);
        this.note(parts.join(" · "), "meta");
        // (a refused turn, or one stopped before any answer, stored nothing: there is no answer
        // to regenerate, only its question to edit)
        if (finish !== "refused" && (finish !== "cancelled" || this.text || this.tools.size)) {
          regenerateButton(this.root);
        }
      } else {
        this.note(`${ev.message || "Something went wrong."} (${ev.code || "error"})` +
                  (ev.retryable ? " You can send it again." : ""), "error");
      }
    }
  }

  function setStatus(kind, text) {
    statusEl.dataset.state = kind;
    statusEl.textContent = text;
  }

  function setRunning(running) {
    state.running = running;
    sendBtn.disabled = running;
    stopBtn.disabled = !running;
    stopBtn.textContent = "Stop";
    updateButtons();
  }

  // -- edit and regenerate ----------------------------------------------------------------
  // Every message of a turn carries its turn id (data-turn-id: from turn_start live, from
  // turn_records in a stored conversation). An answer's Regenerate sends
  // {"type":"message","replace_turn":T} and a question's Edit sends the new text with
  // replace_turn: the server rewinds the session to just before turn T and runs the new turn
  // in its place. The page drops T and everything after it at once and shows the new turn;
  // if that turn stores nothing (it failed, was refused or stopped before answering), the
  // server rewound nothing, and the page shows the conversation as stored again.
  function busy() {
    return state.running || !!state.loading || state.syncing;
  }

  function updateButtons() {
    const off = busy();
    for (const b of logEl.querySelectorAll(".msg-actions button, .msg-edit button.save")) b.disabled = off;
  }

  function actionButton(article, cls, text, label, onClick) {
    let bar = article.querySelector(":scope > .msg-actions");
    if (!bar) {
      bar = el("div", "msg-actions");
      article.append(bar);
    }
    let b = bar.querySelector("." + cls);
    if (b) return b;
    b = el("button", "secondary " + cls, text);
    b.type = "button";
    b.setAttribute("aria-label", label);
    b.title = label;
    b.disabled = busy();
    b.addEventListener("click", () => onClick(article));
    bar.append(b);
    return b;
  }

  function regenerateButton(answer) {
    if (answer.dataset.turnId) actionButton(answer, "regenerate", "Regenerate", "Regenerate this answer", regenerate);
  }

  // A question belongs to turn `turnId`: it can be edited (not one with attachments: the page
  // sends text only, and an edit replaces the whole message).
  function markQuestion(article, turnId) {
    article.dataset.turnId = turnId;
    if (!article.dataset.attachments) actionButton(article, "edit", "Edit", "Edit this message", startEdit);
  }

  function byTurn(role, turnId) {
    return Array.from(logEl.querySelectorAll("article.msg." + role)).find((a) => a.dataset.turnId === turnId) || null;
  }

  function removeFrom(node) {
    while (node) {
      const next = node.nextSibling;
      node.remove();
      node = next;
    }
  }

  function regenerate(answer) {
    const turnId = answer.dataset.turnId;
    if (!turnId || busy() || !state.sessionId) return;
    const question = byTurn("user", turnId);
    removeFrom(question ? question.nextSibling : answer);  // (the question stays: it is sent again)
    startTurn({ type: "message", session_id: state.sessionId, replace_turn: turnId, message_id: newId() }, question, turnId);
    input.focus();
  }

  // An inline form's two buttons: Save submits it, Cancel does not.
  function saveAndCancel() {
    const save = el("button", "save", "Save");
    const cancel = el("button", "secondary", "Cancel");
    save.type = "submit";
    cancel.type = "button";
    return [save, cancel];
  }

  function startEdit(article) {
    if (busy() || article.querySelector(".msg-edit")) return;
    const shown = article.querySelector(":scope > .text");
    const bar = article.querySelector(":scope > .msg-actions");
    const box = el("form", "msg-edit");
    const field = el("textarea");
    field.value = shown ? shown.textContent : "";
    field.rows = Math.min(10, field.value.split("\n").length + 1);
    field.required = true;
    field.setAttribute("aria-label", "Edit your message (Enter to save, Escape to cancel)");
    const [save, cancel] = saveAndCancel();
    save.disabled = busy();
    const buttons = el("div", "msg-edit-actions");
    buttons.append(save, cancel);
    box.append(field, buttons);
    if (shown) shown.hidden = true;
    if (bar) bar.hidden = true;
    article.classList.add("editing");
    article.insertBefore(box, bar);
    const close = () => {
      box.remove();
      if (shown) shown.hidden = false;
      if (bar) bar.hidden = false;
      article.classList.remove("editing");
    };
    box.addEventListener("submit", (e) => {
      e.preventDefault();
      const text = field.value;
      const turnId = article.dataset.turnId;
      if (!text.trim() || busy() || !turnId || !state.sessionId) return;
      removeFrom(article);
      const question = showUser(text);
      startTurn({ type: "message", session_id: state.sessionId, message: text, replace_turn: turnId,
                   message_id: newId() }, question, turnId);
      input.focus();
    });
    cancel.addEventListener("click", () => {
      close();
      const edit = article.querySelector(".msg-actions .edit");
      if (edit) edit.focus();
    });
    field.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        box.requestSubmit();
      } else if (e.key === "Escape") {
        e.preventDefault();
        e.stopPropagation();  // (not the page's Escape: that stops a running answer)
        cancel.click();
      }
    });
    field.focus();
    field.setSelectionRange(field.value.length, field.value.length);
  }

  // A rewinding turn that ended without storing an answer rewound nothing on the server: show
  // the conversation as it is stored, and say what happened.
  async function resync(ev) {
    const id = state.sessionId, token = state.openToken;
    if (!id) return;
    state.syncing = true;
    updateButtons();
    let session = null;
    try {
      const res = await api(`sessions/${encodeURIComponent(id)}`);
      if (res.ok) session = await res.json();
    } catch { /* shown below */ }
    if (token !== state.openToken || id !== state.sessionId) return;  // (left meanwhile: leave() reset it)
    state.syncing = false;
    if (session && !state.running) {
      renderHistory(session);
      state.view = null;
      state.question = null;
    }
    let text = null, cls = "error rewind-note";
    if (ev.type === "error") {
      text = `Not replaced: ${ev.message || "the new turn failed"} (${ev.code || "error"}). ` +
        "The conversation is as it was.";
    } else if (ev.finish === "refused" || ev.stop_reason === "refusal") {
      text = "The model declined to answer; the conversation is as it was.";
      cls = "notice warn rewind-note";
    }
    if (!session) text = (text ? text + " " : "") + "Could not reload the conversation: reopen it to see it as stored.";
    if (text) logEl.append(el("p", cls, text));
    updateButtons();
    scrollDown();
  }

  // -- the connection -------------------------------------------------------------------
  function wsUrl() {
    const url = new URL("agent/ws", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = state.sessionId ? "?session_id=" + encodeURIComponent(state.sessionId) : "";
    return url.href;
  }

  function authHeaders() {
    return state.apiKey ? { Authorization: "Bearer " + state.apiKey } : {};
  }

  async function socketUrl() {
    // With an API key: a single-use ticket from POST /ws-ticket (browsers cannot set headers
    // on a WebSocket, and a key may not be a valid subprotocol token).
    const url = new URL(wsUrl());
    if (!state.apiKey) return url.href;
    const res = await fetch("ws-ticket", { method: "POST", headers: authHeaders() });
    if (res.status === 401 || res.status === 403) {
      showAuth("That API key was refused.");
      return null;
    }
    if (!res.ok) throw new Error("ws-ticket: HTTP " + res.status);
    url.searchParams.set("ticket", (await res.json()).ticket);
    return url.href;
  }

  async function connect() {
    clearTimeout(state.timer);
    state.timer = null;
    if (state.ws) return;
    if (state.connecting) { state.connectAgain = true; return; }
    state.connecting = true;
    const gen = state.gen;
    let url;
    try {
      url = await socketUrl();
    } catch {
      url = undefined;
    } finally {
      state.connecting = false;
    }
    const again = state.connectAgain;
    state.connectAgain = false;
    if (gen !== state.gen) {  // the page moved to another conversation meanwhile: connect for that one
      if (again) connect();
      return;
    }
    if (url === null) return;  // waiting for a (better) API key
    if (url === undefined) { scheduleReconnect(); return; }
    if (state.ws) return;
    const ws = new WebSocket(url);
    let opened = false;
    state.ws = ws;
    ws.onopen = () => {
      if (ws !== state.ws) return;
      opened = true;
      state.failedOpens = 0;
      $("auth").hidden = true;
      state.attempt = 0;
      state.stats.connects += 1;
      state.lastFrameAt = Date.now();
      setStatus("connected", "Connected");
      if (!list.loaded) refreshList();  // (now known to be allowed in: the key, if any, works)
      if (!state.running) return;
      if (state.turnId) {
        state.stats.resumes += 1;
        if (!state.quietResume) state.view.note("The connection dropped; resumed where it left off.");
        state.quietResume = false;
        const seq = state.resumeFrom ?? state.lastSeq;  // (resumeFrom: tests only, see __agent)
        state.resumeFrom = null;
        send({ type: "resume", turn_id: state.turnId, last_event_id: `${state.turnId}:${seq}` });
      } else if (state.pending) {
        state.stats.resent += 1;
        send(state.pending);  // same message_id: the server joins the turn if it started
      }
    };
    ws.onmessage = (msg) => {
      if (ws !== state.ws) return;
      state.lastFrameAt = Date.now();
      let ev;
      try { ev = JSON.parse(msg.data); } catch { return; }
      handle(ev);
    };
    ws.onclose = (close) => {
      if (ws !== state.ws) return;  // a socket we already replaced or closed on purpose
      state.ws = null;
      state.stats.drops += 1;
      if (!opened) {  // the handshake was refused (browsers do not say why): ask over HTTP
        state.failedOpens += 1;
        diagnose();
        return;
      }
      scheduleReconnect();
    };
  }

  async function diagnose() {
    let res = null;
    try {
      res = state.sessionId
        ? await fetch(`sessions/${encodeURIComponent(state.sessionId)}`, { headers: authHeaders() })
        : await fetch("ws-ticket", { method: "POST", headers: authHeaders() });
    } catch { /* the server is unreachable: keep trying */ }
    const code = res && !res.ok ? ((await res.json().catch(() => ({}))).error || {}).code : null;
    if (res && res.status === 404 && state.sessionId) {
      lostSession("it expired or was deleted");
    } else if (res && res.status === 401) {
      showAuth(state.apiKey ? "That API key was refused." : "This server needs an API key.");
    } else if (code === "forbidden_origin") {
      setStatus("disconnected", "Refused: this page's origin is not in the server's ALLOWED_ORIGINS");
    } else {
      scheduleReconnect();
    }
  }

  function scheduleReconnect() {
    if (state.timer) return;
    const delay = Math.min(8000, 250 * 2 ** state.attempt) * (0.8 + Math.random() * 0.4);
    state.attempt += 1;
    setStatus("reconnecting", state.running ? "Connection lost, resuming…" : "Reconnecting…");
    state.timer = setTimeout(connect, delay);
  }

  function drop(ws) {
    // Close without the page noticing it as intended: exactly what a network failure does.
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(4000, "client dropped the connection");
  }

  function send(frame) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(JSON.stringify(frame));
      return true;
    }
    connect();  // the frame that matters (pending message / resume) goes out on open
    return false;
  }

  function lostSession(reason) {
    if (state.view && state.running) {
      state.view.note(`The session is gone (${reason}); send a new message to start another.`, "error");
      state.view.root.setAttribute("aria-busy", "false");
      state.view.root.dataset.state = "error";
    }
    forget(state.sessionId);
    state.sessionId = null;
    state.turnId = null;
    state.pending = null;
    setRunning(false);
    remember();
    setStatus("disconnected", "Session ended");
    scheduleReconnect();
  }

  setInterval(() => {  // a link that went silent (no ping for too long) is reconnected
    if (state.ws && state.ws.readyState === WebSocket.OPEN && Date.now() - state.lastFrameAt > WATCHDOG_MS) {
      const ws = state.ws;
      state.ws = null;
      state.stats.drops += 1;
      drop(ws);
      scheduleReconnect();
    }
  }, 5000);

  // -- events ---------------------------------------------------------------------------
  function parseId(id) {
    const i = typeof id === "string" ? id.lastIndexOf(":") : -1;
    return i > 0 ? [id.slice(0, i), Number(id.slice(i + 1))] : null;
  }

  function handle(ev) {
    const parsed = ev.id ? parseId(ev.id) : null;
    if (!parsed) return control(ev);
    const [turnId, seq] = parsed;
    if (turnId !== state.turnId) {
      // The turn our message just started (its turn_start, or an error if it could not
      // start), else another tab's turn on this session: not ours to show.
      if (!state.running || state.turnId !== null) return;
      state.turnId = turnId;
      state.lastSeq = 0;
    }
    if (seq <= state.lastSeq) {
      state.stats.duplicates += 1;  // already on the page (a replay after resume)
      return;
    }
    state.lastSeq = seq;
    const view = state.view;
    if (view && ev.type !== "thinking_delta" && ev.type !== "thinking_redacted") view.endThinking();  // (thinking is never mixed into the answer)
    switch (ev.type) {
      case "turn_start":
        state.sessionId = ev.session_id;
        state.pending = null;
        remember();
        if (Array.isArray(ev.rewound_turns) && ev.rewound_turns.length) {
          // A turn replacing earlier ones (an edit or regenerate, maybe found running on opening
          // the conversation): what it replaces leaves the page.
          state.rewinding = state.rewinding || ev.rewound_turns[0];
          const gone = new Set(ev.rewound_turns);
          for (const a of Array.from(logEl.querySelectorAll("article.msg"))) {
            if (gone.has(a.dataset.turnId) && a !== state.question && (!view || a !== view.root)) a.remove();
          }
        }
        if (!state.question && view && typeof ev.user_text === "string" && ev.user_text) {
          state.question = showUser(ev.user_text, view.root);  // coming back to a running turn: its question
        }
        if (view) view.root.dataset.turnId = turnId;
        if (state.question) markQuestion(state.question, turnId);
        if (!list.items.some((s) => s.session_id === ev.session_id)) refreshList();  // a new conversation
        break;
      case "text_delta": view.appendText(ev.text); break;
      case "thinking_delta": view.appendThinking(String(ev.thinking ?? "")); break;
      case "thinking_redacted": view.appendThinking(REDACTED); break;
      case "citation": view.cite(ev.citation); break;
      case "tool_call": view.tool(ev.tool_use_id, ev.name, ev.server); break;
      case "tool_input": view.toolInput(ev); break;
      case "tool_result": view.toolResult(ev); break;
      case "tool_approval_request": view.approvalRequest(ev); break;
      case "client_tool_call": view.clientCall(ev); break;
      case "tool_approval": view.approval(ev); break;
      case "turn_end":
      case "error": {
        view.finish(ev);
        const rewound = state.rewinding;
        state.pending = null;
        state.rewinding = null;
        setRunning(false);
        input.focus();
        // (an answer stopped with some text, or a complete one, did replace the old turn)
        if (rewound && (ev.type === "error" || ev.cancelled || ev.finish === "refused")) resync(ev);
        refreshList();  // its place, title, preview and totals in the list
        if (state.firstTurn) setTimeout(refreshList, 5000);  // (a model-made title comes a moment later)
        state.firstTurn = false;
        break;
      }
    }
    scrollDown();
  }

  function control(ev) {
    switch (ev.type) {
      case "ping": case "pong": return;
      case "no_active_turn":
        // Reconnected too late: the turn's event log expired. Its answer is in the history.
        if (state.running) recoverFromHistory();
        return;
      case "error":  // a frame the server refused (busy session, bad message, ...)
        if (state.running && !state.turnId) {
          state.view.finish(ev);
          const rewound = state.rewinding;
          state.pending = null;
          state.rewinding = null;
          setRunning(false);
          if (rewound) resync(ev);  // (e.g. turn_not_found: that turn is no longer in the session)
        } else if (state.view) {
          state.view.note(ev.message || ev.code, "error");
        }
        return;
    }
  }

  async function recoverFromHistory() {
    const view = state.view;
    if (state.rewinding) {  // (whether it replaced anything is in the stored conversation)
      state.rewinding = null;
      setRunning(false);
      resync({ type: "turn_end", finish: "unknown" });
      return;
    }
    try {
      const res = await fetch(`sessions/${encodeURIComponent(state.sessionId)}`, { headers: authHeaders() });
      const session = await res.json();
      const last = (session.messages || []).filter((m) => m.role === "assistant").pop();
      const blocks = last && Array.isArray(last.content) ? last.content : [];
      const text = blocks.filter((b) => b.type === "text").map((b) => b.text).join("");
      if (text.startsWith(view.text)) view.appendText(text.slice(view.text.length));
      view.closeSegment();
      view.note("Recovered from the session history after a lost connection.");
    } catch {
      view.note("The connection was lost and the answer could not be recovered.", "error");
    }
    view.root.setAttribute("aria-busy", "false");
    view.root.dataset.state = "done";
    setRunning(false);
  }

  // -- the user's side ------------------------------------------------------------------
  function newId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function submit() {
    const text = input.value;
    if (!text.trim() || busy()) return;
    input.value = "";
    startTurn({ type: "message", message: text, message_id: newId() }, showUser(text), null);
  }

  // Send a message frame and show its turn (`question`: the user's message already on the
  // page; `replacing`: the turn it replaces, for an edit or regenerate).
  function startTurn(frame, question, replacing) {
    state.view = new AnswerView();
    state.question = question;
    state.rewinding = replacing;
    state.turnId = null;
    state.lastSeq = 0;
    state.pending = frame;
    state.firstTurn = !state.sessionId;
    setRunning(true);
    send(frame);
  }

  function stop() {
    if (!state.running) return;
    stopBtn.disabled = true;
    stopBtn.textContent = "Stopping…";
    if (!send({ type: "cancel" }) && state.sessionId) {
      fetch(`sessions/${encodeURIComponent(state.sessionId)}/cancel`, { method: "POST", headers: authHeaders() })
        .catch(() => {});
    }
  }

  form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
  });
  // Keyboard: Esc closes the list on a narrow screen, else stops the answer; Ctrl/Cmd+Shift+O: new chat.
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      if (appEl.classList.contains("sidebar-open")) { setSidebar(false); return; }
      stop();
    } else if ((e.ctrlKey || e.metaKey) && e.shiftKey && !e.altKey && e.code === "KeyO") {
      e.preventDefault();
      newChat();
    }
  });
  stopBtn.addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);

  // -- conversations: the sidebar ------------------------------------------------------
  // The caller's sessions, newest activity first (GET /sessions, paged with "More"). The page
  // remembers the one it shows (sessionStorage), so a reload reopens it.
  const appEl = $("app");
  const NARROW = window.matchMedia("(max-width: 700px)");
  const PAGE_SIZE = 20;
  const list = { items: [], cursor: null, loaded: false, busy: null, editing: null };
  const EMPTY_TEXT = "Ask something. Answers stream in as they are written; thinking, tool calls and sources show up as they come.";

  function api(path, init = {}) {
    const headers = { ...authHeaders() };
    if (init.body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(path, { ...init, headers });
  }

  function remember() {
    if (state.sessionId) sessionStorage.setItem("agent.sessionId", state.sessionId);
    else sessionStorage.removeItem("agent.sessionId");
    const current = list.items.find((s) => s.session_id === state.sessionId);
    document.title = current && current.title ? `${current.title} · Agent chat` : "Agent chat";
    renderList();
  }

  function forget(sessionId) {
    list.items = list.items.filter((s) => s.session_id !== sessionId);
    if (list.editing === sessionId) list.editing = null;
    renderList();
  }

  function showEmpty(text = EMPTY_TEXT) {
    const p = el("p", "empty", text);
    p.id = "empty";
    logEl.replaceChildren(p);
  }

  function showListError(text) {
    const box = $("list-error");
    box.textContent = text;
    box.hidden = !text;
  }

  // Stop showing the current conversation (its running turn, if any, goes on on the server).
  function leave() {
    state.gen += 1;
    const ws = state.ws;
    state.ws = null;
    if (ws) ws.close(1000, "left the conversation");
    clearTimeout(state.timer);
    state.timer = null;
    if (state.view) state.view.closeSegment();
    Object.assign(state, { sessionId: null, turnId: null, lastSeq: 0, pending: null, view: null, resumeFrom: null,
                           quietResume: false, attempt: 0, loading: false, reopen: null, connectAgain: false,
                           question: null, rewinding: null, syncing: false });
    setRunning(false);
    logEl.replaceChildren();
  }

  function newChat() {
    state.openToken += 1;
    leave();
    showEmpty();
    remember();
    setSidebar(false);
    connect();
    input.focus();
  }

  async function openSession(id) {
    if (id === state.sessionId && !state.loading && state.ws) { setSidebar(false); return; }
    const token = ++state.openToken;
    leave();
    state.sessionId = id;
    state.loading = true;
    remember();
    setSidebar(false);
    showEmpty("Loading the conversation…");
    let res = null;
    try { res = await api(`sessions/${encodeURIComponent(id)}`); } catch { /* unreachable: shown below */ }
    if (token !== state.openToken) return;
    if (res && res.status === 404) {
      forget(id);
      newChat();
      showListError("That conversation is gone (it expired or was deleted).");
      return;
    }
    if (res && res.status === 401) {
      state.reopen = id;
      showAuth(state.apiKey ? "That API key was refused." : "This server needs an API key.");
      return;
    }
    let session = null;
    if (res && res.ok) session = await res.json().catch(() => null);
    if (token !== state.openToken) return;
    state.loading = false;
    if (!session) {
      showEmpty();
      logEl.append(el("p", "error", `Could not load this conversation${res ? ` (HTTP ${res.status})` : ""}.`));
    } else {
      renderHistory(session);
      if (session.running_turn_id) {  // a turn still running: follow it from its start
        state.view = new AnswerView();  // (its question comes with its turn_start: user_text)
        state.question = null;
        state.turnId = session.running_turn_id;
        state.lastSeq = 0;
        state.quietResume = true;
        setRunning(true);
      }
    }
    updateButtons();
    connect();
    requestAnimationFrame(() => window.scrollTo(0, document.body.scrollHeight));
    input.focus();
  }

  // A stored conversation, as the live turns showed it: user messages, then each turn's answer
  // (text, thinking, tool calls and results, sources) with its usage and cost from turn_records.
  function renderHistory(session) {
    logEl.replaceChildren();
    const messages = Array.isArray(session.messages) ? session.messages : [];
    const ends = new Map();  // index of a turn's last message -> its record
    const turnAt = [];       // index of a message -> the id of the turn that stored it
    let at = 0;
    for (const r of Array.isArray(session.turn_records) ? session.turn_records : []) {
      const n = r && Number.isInteger(r.messages) ? r.messages : 0;
      for (let k = at; k < at + n; k++) turnAt[k] = typeof r.turn_id === "string" ? r.turn_id : null;
      if (n > 0) { at += n; ends.set(at - 1, r); }
    }
    let view = null;
    const settle = () => {
      if (!view) return;
      view.endThinking();
      view.closeSegment();
      view.root.setAttribute("aria-busy", "false");
      view.root.dataset.state = "done";
      view = null;
    };
    messages.forEach((m, i) => {
      const blocks = typeof m.content === "string" ? [{ type: "text", text: m.content }]
        : Array.isArray(m.content) ? m.content : [];
      if (m.role === "user") {
        const asked = blocks.filter((b) => b && b.type !== "tool_result");
        if (asked.length) {
          settle();
          const question = showUserBlocks(asked);
          if (turnAt[i]) markQuestion(question, turnAt[i]);
        }
        for (const b of blocks) if (b && b.type === "tool_result" && view) view.replayResult(b);
      } else if (m.role === "assistant") {
        if (!view) view = new AnswerView();
        view.replay(blocks);
      }
      const record = ends.get(i);
      if (record && view) {
        if (typeof record.turn_id === "string") view.root.dataset.turnId = record.turn_id;
        view.finish({ type: "turn_end", cancelled: record.status === "cancelled", stop_reason: record.stop_reason,
                      truncated: ["max_tokens", "model_context_window_exceeded"].includes(record.stop_reason),
                      stop_details: record.stop_details, usage: record.usage,
                      estimated_cost_usd: record.estimated_cost_usd });
        view = null;
      }
    });
    settle();
    if (!messages.length) showEmpty();
  }

  function showUserBlocks(blocks) {
    const msg = addMessage("user");
    const text = blocks.filter((b) => b.type === "text").map((b) => String(b.text ?? "")).join("\n");
    for (const b of blocks) {
      if (b.type !== "image" && b.type !== "document") continue;
      msg.dataset.attachments = "true";
      msg.append(el("div", "attachment", b.type === "image" ? "Image" : "Document" +
        (typeof b.title === "string" && b.title ? ": " + b.title : "")));
    }
    if (text) msg.append(el("div", "text", text));
    return msg;
  }

  // The first page again, merged into the list (pages loaded with "More" keep their place).
  async function refreshList() {
    if (list.busy) { list.again = true; return; }
    list.busy = "refresh";
    try {
      const res = await api(`sessions?limit=${PAGE_SIZE}`);
      if (!res.ok) {
        if (res.status !== 401) showListError(`Could not list the conversations (HTTP ${res.status}).`);
        return;
      }
      const page = await res.json();
      const fresh = Array.isArray(page.sessions) ? page.sessions : [];
      const ids = new Set(fresh.map((s) => s.session_id));
      const older = list.items.filter((s) => !ids.has(s.session_id));
      if (!list.loaded) list.cursor = page.next_cursor || null;
      list.items = [...fresh, ...older];
      list.loaded = true;
      showListError("");
    } catch {
      showListError("Could not list the conversations.");
    } finally {
      list.busy = null;
      remember();
    }
    if (list.again) { list.again = false; refreshList(); }
  }

  async function loadMore() {
    if (!list.cursor || list.busy) return;
    list.busy = "more";
    const more = $("more");
    more.disabled = true;
    try {
      const res = await api(`sessions?limit=${PAGE_SIZE}&cursor=${encodeURIComponent(list.cursor)}`);
      if (!res.ok) { showListError(`Could not list more (HTTP ${res.status}).`); return; }
      const page = await res.json();
      const known = new Set(list.items.map((s) => s.session_id));
      list.items.push(...(page.sessions || []).filter((s) => !known.has(s.session_id)));
      list.cursor = page.next_cursor || null;
    } catch {
      showListError("Could not list more.");
    } finally {
      list.busy = null;
      more.disabled = false;
      renderList();
    }
  }

  function ago(t) {
    const s = Math.max(0, Date.now() / 1000 - Number(t || 0));
    if (s < 60) return "just now";
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return new Date(t * 1000).toLocaleDateString();
  }

  function titleOf(s) {
    return typeof s.title === "string" && s.title.trim() ? s.title : "New conversation";
  }

  // Rows are kept (not rebuilt) while what they show is the same: a refresh landing during a
  // click or with the keyboard focus on a row changes nothing under the pointer or the focus.
  const rows = new Map();  // session id -> { key, li }
  function renderList() {
    if (list.editing) return;  // (not while a row is being renamed or deleted)
    const ul = $("conversations");
    const wanted = list.items.map((s) => {
      const key = JSON.stringify([titleOf(s), rowMeta(s), s.preview || "", s.session_id === state.sessionId]);
      let row = rows.get(s.session_id);
      if (!row || row.key !== key) {
        row = { key, li: listItem(s) };
        rows.set(s.session_id, row);
      }
      return row.li;
    });
    const keep = new Set(list.items.map((s) => s.session_id));
    for (const id of Array.from(rows.keys())) if (!keep.has(id)) rows.delete(id);
    wanted.forEach((li, i) => { if (ul.children[i] !== li) ul.insertBefore(li, ul.children[i] || null); });
    while (ul.children.length > wanted.length) ul.lastElementChild.remove();
    $("more").hidden = !list.cursor;
    $("no-conversations").hidden = !list.loaded || list.items.length > 0;
  }

  function rowMeta(s) {
    const turns = Number(s.turns) || 0;
    const cost = typeof s.estimated_cost_usd === "number" && s.estimated_cost_usd > 0
      ? ` · $${s.estimated_cost_usd.toFixed(4)}` : "";
    return `${turns} turn${turns === 1 ? "" : "s"} · ${ago(s.updated_at)}${cost}` +
      (s.running_turn_id ? " · answering…" : "");
  }

  function smallButton(cls, label, glyph) {
    const b = el("button", "secondary icon " + cls, glyph);
    b.type = "button";
    b.setAttribute("aria-label", label);
    b.title = label;
    return b;
  }

  function listItem(s) {
    const li = el("li", "conv");
    li.dataset.sessionId = s.session_id;
    const open = el("button", "conv-open");
    open.type = "button";
    open.append(el("span", "conv-title", titleOf(s)), el("span", "conv-meta", rowMeta(s)));
    if (typeof s.preview === "string" && s.preview) open.title = s.preview;
    if (s.session_id === state.sessionId) {
      li.classList.add("current");
      open.setAttribute("aria-current", "true");
    }
    open.addEventListener("click", () => openSession(s.session_id));
    const rename = smallButton("conv-rename", `Rename “${titleOf(s)}”`, "✎");
    rename.addEventListener("click", () => startRename(li, s));
    const del = smallButton("conv-delete", `Delete “${titleOf(s)}”`, "✕");
    del.addEventListener("click", () => confirmDelete(li, s));
    li.append(open, rename, del);
    return li;
  }

  function startRename(li, s) {
    list.editing = s.session_id;
    const box = el("form", "conv-edit");
    const field = el("input");
    field.value = titleOf(s);
    field.maxLength = 200;
    field.required = true;
    field.setAttribute("aria-label", "New title");
    const [save, cancel] = saveAndCancel();
    const problem = el("span", "error");
    const done = () => { list.editing = null; rows.delete(s.session_id); renderList(); };
    box.append(field, save, cancel, problem);
    box.addEventListener("submit", async (e) => {
      e.preventDefault();
      const title = field.value.trim();
      if (!title) return;
      save.disabled = true;
      try {
        const res = await api(`sessions/${encodeURIComponent(s.session_id)}`,
                              { method: "PATCH", body: JSON.stringify({ title }) });
        if (res.ok) {
          const summary = await res.json();
          list.items = list.items.map((x) => (x.session_id === s.session_id ? { ...x, ...summary } : x));
          done();
          remember();
        } else if (res.status === 404) {
          forget(s.session_id);
          done();
        } else {
          const err = (await res.json().catch(() => ({}))).error || {};
          problem.textContent = err.message || `HTTP ${res.status}`;
          save.disabled = false;
        }
      } catch {
        problem.textContent = "Not saved: the server is unreachable.";
        save.disabled = false;
      }
    });
    cancel.addEventListener("click", done);
    field.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { e.stopPropagation(); done(); }
    });
    li.replaceChildren(box);
    field.focus();
    field.select();
  }

  function confirmDelete(li, s) {
    list.editing = s.session_id;
    const [box, yes, no] = choice("conv-confirm", "Confirm deletion", ["Delete", "danger"], ["Cancel", "secondary"]);
    box.append(el("span", "conv-question", `Delete “${titleOf(s)}”?`), yes, no);
    const done = () => { list.editing = null; rows.delete(s.session_id); renderList(); };
    yes.addEventListener("click", async () => {
      yes.disabled = true;
      let res = null;
      try {
        res = await api(`sessions/${encodeURIComponent(s.session_id)}`, { method: "DELETE" });
      } catch { /* below */ }
      if (res && (res.ok || res.status === 404)) {
        done();
        forget(s.session_id);
        if (s.session_id === state.sessionId) newChat();
      } else {
        done();
        showListError(`Not deleted${res ? ` (HTTP ${res.status})` : ": the server is unreachable"}.`);
      }
    });
    no.addEventListener("click", done);
    box.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { e.stopPropagation(); done(); }
    });
    li.replaceChildren(box);
    no.focus();
  }

  // Narrow screens: the list slides in over the page behind the ☰ button.
  function setSidebar(open) {
    appEl.classList.toggle("sidebar-open", open && NARROW.matches);
    $("sidebar-toggle").setAttribute("aria-expanded", String(open && NARROW.matches));
    $("scrim").hidden = !(open && NARROW.matches);
    if (open && NARROW.matches) {
      const first = document.querySelector("#conversations .current .conv-open, #conversations .conv-open");
      (first || $("sidebar-close")).focus();
    }
  }

  $("sidebar-toggle").addEventListener("click", () => setSidebar(!appEl.classList.contains("sidebar-open")));
  $("sidebar-close").addEventListener("click", () => { setSidebar(false); $("sidebar-toggle").focus(); });
  $("scrim").addEventListener("click", () => setSidebar(false));
  $("more").addEventListener("click", loadMore);
  NARROW.addEventListener("change", () => setSidebar(false));

  function showAuth(message) {
    $("auth").hidden = false;
    $("auth-error").textContent = message;
    setStatus("disconnected", "Not connected");
  }

  $("auth").addEventListener("submit", (e) => {
    e.preventDefault();
    state.apiKey = $("api-key").value.trim();
    if (state.apiKey) sessionStorage.setItem("agent.apiKey", state.apiKey);
    else sessionStorage.removeItem("agent.apiKey");
    $("auth-error").textContent = "";
    state.attempt = 0;
    state.failedOpens = 0;
    if (state.reopen) openSession(state.reopen);
    else connect();
  });

  fetch("health").then((r) => r.json()).then((h) => {
    if (h.offline_model) $("offline").hidden = false;
  }).catch(() => {});

  // For tests and debugging: drop the socket like a network failure would, and look inside.
  window.__agent = {
    // `resumeFrom`: ask for a replay from an earlier seq than the page has (the page must
    // then skip what it already shows).
    dropConnection({ resumeFrom = null } = {}) { state.resumeFrom = resumeFrom; drop(state.ws); },
    state() {
      return { sessionId: state.sessionId, turnId: state.turnId, lastSeq: state.lastSeq,
               running: state.running, rewinding: state.rewinding, syncing: state.syncing, connected: !!state.ws && state.ws.readyState === WebSocket.OPEN,
               loading: !!state.loading, listed: list.items.map((s) => s.session_id), moreCursor: list.cursor,
               stats: { ...state.stats, markdownRenders: window.AgentMarkdown.stats.renders } };
    },
  };

  const saved = sessionStorage.getItem("agent.sessionId");
  if (saved) openSession(saved);
  else connect();
  input.focus();
})();
