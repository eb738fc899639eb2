"""A terminal chat with the agent server: `scripts/chat [--sse] [--url URL]`.

Streams each answer as it is written, over the WebSocket (default) or Server-Sent Events
(`--sse`); keeps one session across lines (`--session=ID` to continue an old one). Ctrl-C
while an answer streams cancels that turn (the partial answer is kept); Ctrl-C or Ctrl-D at
the prompt quits. A dropped connection is resumed where it left off. Needs only the standard
library and `websockets` (installed with uvicorn[standard] from requirements.txt).

Answer text goes to stdout; tool calls, usage and notices to stderr.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from typing import Any, Iterator

RECONNECTS = 5


class TurnDone(Exception):
    pass


class Chat:
    def __init__(self, args: argparse.Namespace):
        self.url = urllib.parse.urlsplit(args.url.rstrip("/"))
        if self.url.scheme not in ("http", "https"):
            raise SystemExit("--url must be http:// or https://")
        self.headers = dict(h.split(":", 1) for h in args.header)
        self.headers = {k.strip(): v.strip() for k, v in self.headers.items()}
        if args.api_key:
            self.headers["Authorization"] = f"Bearer {args.api_key}"
        self.extra = {k: v for k, v in (("model", args.model), ("system", args.system)) if v}
        self.session_id: str | None = args.session
        self.sse = args.sse
        self.ws: Any = None
        self.turn_id: str | None = None
        self.last_seq = 0
        self.cancelled = False
        self.color = sys.stderr.isatty()

    # -- output ----------------------------------------------------------------------------
    def note(self, text: str) -> None:
        if self.color:
            text = f"\033[2m{text}\033[0m"
        print(text, file=sys.stderr, flush=True)

    def show(self, event: dict[str, Any]) -> None:
        """Print one event; raise TurnDone after the last one of a turn."""
        kind = event.get("type")
        if kind == "text_delta":
            sys.stdout.write(event["text"])
            sys.stdout.flush()
        elif kind == "thinking_delta":  # (on stderr, dimmed: never mixed into the answer)
            sys.stderr.write(f"\033[2m{event['thinking']}\033[0m" if self.color else event["thinking"])
            sys.stderr.flush()
        elif kind == "citation":
            cite = event.get("citation") or {}
            self.note(f"\n  [source: {cite.get('url') or cite.get('document_title') or cite.get('type')}]")
        elif kind == "tool_input":
            self.note(f"\n  · {event['name']} {json.dumps(event['input'], ensure_ascii=False)}")
        elif kind == "tool_result":
            value = event.get("error") if event.get("is_error") else event.get("output")
            self.note(f"  {'✗' if event.get('is_error') else '→'} {value}")
        elif kind == "turn_end":
            print(flush=True)
            u = event.get("usage") or {}
            meta = f"{u.get('input_tokens', 0)} in / {u.get('output_tokens', 0)} out tokens"
            if event.get("estimated_cost_usd") is not None:
                meta += f", ${event['estimated_cost_usd']:.4f}"
            finish = event.get("finish")
            if finish in ("truncated", "refused", "unknown"):
                meta = f"{finish} ({event.get('stop_reason')}); {meta}"
            self.note(f"  [stopped; {meta}]" if event.get("cancelled") else f"  [{meta}]")
            raise TurnDone
        elif kind == "error":
            print(flush=True)
            self.note(f"  [error {event.get('code')}: {event.get('message')}]")
            raise TurnDone

    def accept(self, event: dict[str, Any]) -> bool:
        """Track the position in the turn; False for an event already shown (a replay)."""
        eid = event.get("id")
        if not isinstance(eid, str) or ":" not in eid:
            return True
        turn_id, _, seq = eid.rpartition(":")
        if event.get("type") == "turn_start" or self.turn_id is None:
            if turn_id != self.turn_id:
                self.turn_id, self.last_seq = turn_id, 0
            if event.get("session_id"):
                self.session_id = event["session_id"]
        if turn_id != self.turn_id or int(seq) <= self.last_seq:
            return False
        self.last_seq = int(seq)
        return True

    # -- HTTP ------------------------------------------------------------------------------
    def connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        return cls(self.url.netloc, timeout=timeout)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        conn = self.connection()
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {**self.headers, **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        conn.request(method, self.url.path + path, body=data, headers=all_headers)
        return conn.getresponse()

    def cancel_over_http(self) -> None:
        if self.session_id:
            try:
                self.request("POST", f"/sessions/{self.session_id}/cancel").read()
            except OSError as exc:
                self.note(f"  [could not cancel: {exc}]")

    # -- a turn over SSE -------------------------------------------------------------------
    def sse_events(self, response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
        data: list[str] = []
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
            elif not line and data:
                yield json.loads("\n".join(data))
                data = []

    def turn_sse(self, body: dict[str, Any]) -> None:
        try:
            response = self.request("POST", "/agent/stream", body, {"Accept": "text/event-stream"})
        except OSError as exc:
            self.note(f"  [cannot reach {self.url.geturl()}: {exc}]")
            return
        if response.status != 200:
            error = json.loads(response.read() or b"{}").get("error", {})
            self.note(f"  [error {response.status} {error.get('code')}: {error.get('message')}]")
            return
        self.session_id = response.getheader("X-Session-ID") or self.session_id
        for attempt in range(RECONNECTS + 1):
            try:
                for event in self.sse_events(response):
                    if self.accept(event):
                        self.show(event)
            except TurnDone:
                return
            except (OSError, http.client.HTTPException, ValueError):
                pass
            # The stream ended without its last event: resume after the last one seen.
            time.sleep(min(0.25 * 2 ** attempt, 4))
            self.note("  [connection lost; resuming]")
            try:
                response = self.request("GET", f"/sessions/{self.session_id}/stream",
                                        headers={"Last-Event-ID": f"{self.turn_id}:{self.last_seq}"})
            except OSError:
                continue
            if response.status == 204:
                self.note("  [the turn is over; its end was missed]")
                return
        self.note("  [gave up resuming]")

    # -- a turn over the WebSocket ---------------------------------------------------------
    def ws_connect(self) -> None:
        from websockets.sync.client import connect

        scheme = "wss" if self.url.scheme == "https" else "ws"
        query = f"?session_id={urllib.parse.quote(self.session_id)}" if self.session_id else ""
        uri = f"{scheme}://{self.url.netloc}{self.url.path}/agent/ws{query}"
        try:  # websockets >= 16 asks for `legacy=True` to return the connection directly
            self.ws = connect(uri, additional_headers=self.headers, open_timeout=10, legacy=True)
        except TypeError:
            self.ws = connect(uri, additional_headers=self.headers, open_timeout=10)

    def turn_ws(self, body: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        frame = {"type": "message", **body}
        for attempt in range(RECONNECTS + 1):
            try:
                if self.ws is None:
                    self.ws_connect()
                    if self.turn_id is not None:
                        self.ws.send(json.dumps({"type": "resume", "turn_id": self.turn_id,
                                                 "last_event_id": f"{self.turn_id}:{self.last_seq}"}))
                if frame is not None:  # (sent again after a drop before turn_start: same message_id)
                    self.ws.send(json.dumps(frame))
                while True:
                    event = json.loads(self.ws.recv())
                    if event.get("type") == "turn_start":
                        frame = None
                    if event.get("type") == "error" and "id" not in event:
                        self.note(f"  [error {event.get('code')}: {event.get('message')}]")
                        return
                    if event.get("type") == "no_active_turn":
                        self.note("  [the turn is over; its end was missed]")
                        return
                    if self.accept(event):
                        self.show(event)
            except TurnDone:
                return
            except (ConnectionClosed, OSError) as exc:
                self.ws = None
                if self.turn_id is None and frame is not None and not isinstance(exc, ConnectionClosed):
                    self.note(f"  [cannot reach {self.url.geturl()}: {exc}]")
                    return
                if attempt == RECONNECTS:
                    self.note(f"  [gave up reconnecting: {exc}]")
                    return
                self.note("  [connection lost; resuming]")
                time.sleep(min(0.25 * 2 ** attempt, 4))

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.note("\n  [cancelling…]")
        if not self.sse and self.ws is not None:
            try:
                self.ws.send(json.dumps({"type": "cancel"}))
                return
            except Exception:  # noqa: BLE001 — fall back to HTTP
                pass
        self.cancel_over_http()

    # -- the loop --------------------------------------------------------------------------
    def turn(self, text: str) -> None:
        body: dict[str, Any] = {"message": text, "message_id": uuid.uuid4().hex, **self.extra}
        if self.session_id:
            body["session_id"] = self.session_id
        self.turn_id, self.last_seq, self.cancelled = None, 0, False

        def on_sigint(signum: int, frame: Any) -> None:
            if self.cancelled:  # a second Ctrl-C: stop waiting
                raise KeyboardInterrupt
            threading.Thread(target=self.cancel, daemon=True).start()

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            (self.turn_sse if self.sse else self.turn_ws)(body)
        finally:
            signal.signal(signal.SIGINT, previous)

    def run(self) -> int:
        interactive = sys.stdin.isatty()
        if interactive:
            self.note(f"chat with {self.url.geturl()} over {'SSE' if self.sse else 'WebSocket'}; "
                      "Ctrl-C stops an answer, Ctrl-D quits")
        try:
            while True:
                try:
                    line = input("you> " if interactive else "")
                except EOFError:
                    break
                if line.strip():
                    self.turn(line)
        except KeyboardInterrupt:
            print(file=sys.stderr)
        finally:
            if self.ws is not None:
                self.ws.close()
            if self.session_id:
                self.note(f"session: {self.session_id}")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("AGENT_URL", "http://127.0.0.1:8000"),
                        help="server base URL (env AGENT_URL; default %(default)s)")
    parser.add_argument("--sse", action="store_true", help="stream over Server-Sent Events, not the WebSocket")
    parser.add_argument("--session", help="continue this session id (--session=ID also takes an id starting with '-')")
    parser.add_argument("--api-key", default=os.environ.get("AGENT_API_KEY"),
                        help="sent as Authorization: Bearer (env AGENT_API_KEY)")
    parser.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'",
                        help="an extra request header (repeatable)")
    parser.add_argument("--model", help="one of the server's ALLOWED_MODELS")
    parser.add_argument("--system", help="system prompt (if the server allows one)")
    args = parser.parse_args(argv)
    if any(":" not in h for h in args.header):
        parser.error("--header takes 'Name: value'")
    return Chat(args).run()


if __name__ == "__main__":
    sys.exit(main())
