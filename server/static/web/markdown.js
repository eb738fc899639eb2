// Markdown answers, rendered safely: `marked` (vendor/marked.min.js) turns the model's text into
// HTML and `DOMPurify` (vendor/purify.min.js) cleans it before it reaches the page.
//
// Why both, and why this way: the model's text is untrusted (it can quote a web page, a
// document or a prompt injection). Raw HTML in the Markdown is never passed through: it is
// shown as text (`<script>` reads as "<script>"), and whatever marked itself emits still goes
// through DOMPurify. Links are http(s) only and open in a new tab without an opener or
// referrer; images become links (the page's CSP allows no other origin's images, and a remote
// image would tell its server who reads the answer).
//
// Streaming: an answer grows a word at a time; re-parsing all of it on every delta would cost
// O(n²). A Segment renders at most every THROTTLE_MS, and top-level blocks that are complete
// (a later block has started after them) are rendered once and kept; only the last block is
// re-rendered. finish() renders the whole segment once more, so the final page is exactly what
// a one-shot render would give (reference links, loose lists...).
(() => {
  "use strict";

  const THROTTLE_MS = 60;
  const stats = { renders: 0 };  // incremental renders, all segments (tests check the throttle)
  const ready = typeof window.marked === "object" && typeof window.DOMPurify === "function";

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                  "'": "&#39;" })[c]);
  }

  function safeHref(url) {
    if (typeof url !== "string") return null;
    try {
      const u = new URL(url);  // (no base: a relative or scheme-less URL throws)
      return u.protocol === "https:" || u.protocol === "http:" ? u.href : null;
    } catch {
      return null;
    }
  }

  let md = null, purify = null;
  if (ready) {
    md = new window.marked.Marked({
      gfm: true,
      breaks: false,
      renderer: {
        html({ text, block }) {  // raw HTML: shown as text, never parsed
          return block ? `<p>${escapeHtml(text.replace(/\n+$/, ""))}</p>\n` : escapeHtml(text);
        },
        image({ href, text }) {  // an image: a link to it (its alt text as the label)
          return `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`;
        },
      },
    });
    purify = window.DOMPurify(window);  // (our own instance: its hooks touch nobody else's)
    purify.addHook("afterSanitizeAttributes", (node) => {
      if (node.nodeName === "A") {
        const href = safeHref(node.getAttribute("href"));
        if (href) {
          node.setAttribute("href", href);
          node.setAttribute("target", "_blank");
          node.setAttribute("rel", "noopener noreferrer");
        } else {
          node.removeAttribute("href");
        }
      } else if (node.nodeName === "INPUT" && node.getAttribute("type") !== "checkbox") {
        node.remove();  // (task lists' checkboxes only)
      } else if (node.nodeName === "INPUT") {
        node.setAttribute("disabled", "");
      }
    });
  }
  const PURIFY = {
    RETURN_DOM_FRAGMENT: true,
    FORBID_TAGS: ["style", "img", "svg", "math", "form", "button", "textarea", "select", "iframe", "video",
                  "audio", "source", "picture"],
    FORBID_ATTR: ["style", "id", "name", "srcset"],
  };

  // Markdown source -> a sanitised DocumentFragment (top-level whitespace between blocks dropped,
  // so an element's textContent is the answer's text).
  function toFragment(src) {
    if (!ready) {
      const frag = document.createDocumentFragment();
      const p = document.createElement("p");
      p.className = "plain";
      p.textContent = src;
      frag.append(p);
      return frag;
    }
    const frag = purify.sanitize(md.parse(src), PURIFY);
    for (const n of Array.from(frag.childNodes)) {
      if (n.nodeType === Node.TEXT_NODE && !n.data.trim()) n.remove();
    }
    return frag;
  }

  // One run of the model's text in an answer, rendered into `root` as it streams.
  class Segment {
    constructor(root) {
      this.root = root;
      this.src = "";
      this.frozen = 0;      // how much of src is rendered for good (complete top-level blocks)
      this.live = [];       // the nodes of the rest, replaced at each render
      this.timer = null;
      this.renders = 0;
    }
    append(text) {
      this.src += String(text).replace(/\r\n?/g, "\n");
      if (!this.timer) this.timer = setTimeout(() => { this.timer = null; this.render(); }, THROTTLE_MS);
    }
    render() {
      this.renders += 1;
      stats.renders += 1;
      let rest = this.src.slice(this.frozen);
      if (ready) {
        const tokens = md.lexer(rest);
        let last = tokens.length - 1;
        while (last > 0 && tokens[last].type === "space") last -= 1;
        if (last > 0) {  // blocks before the last one are complete: render them once, keep them
          const done = tokens.slice(0, last).map((t) => t.raw).join("");
          if (rest.startsWith(done)) {
            for (const n of this.live) n.remove();
            this.live = [];
            this.root.append(toFragment(done));
            this.frozen += done.length;
            rest = rest.slice(done.length);
          }
        }
      }
      for (const n of this.live) n.remove();
      const frag = toFragment(rest);
      this.live = Array.from(frag.childNodes);
      this.root.append(frag);
    }
    // The segment is complete: one render of all of it (what a one-shot render gives).
    finish() {
      clearTimeout(this.timer);
      this.timer = null;
      this.root.replaceChildren(toFragment(this.src));
      this.frozen = this.src.length;
      this.live = [];
    }
  }

  window.AgentMarkdown = { ready, toFragment, Segment, safeHref, THROTTLE_MS, stats };
})();
