"""A deadline for the request head (`HEADER_TIMEOUT_SECONDS`), which uvicorn does not have.

uvicorn's timers cover an idle keep-alive connection, not a client that connects and sends
nothing or trickles a head byte by byte: this is uvicorn's httptools protocol plus one timer
per request head. When it fires, a partly sent head gets a 408 `request_timeout`; an idle
connection is closed. Bodies (`BODY_TIMEOUT_SECONDS`, server/security), answers and WebSockets
are not timed here. Used by `python -m server` and the Procfile (`--http server.http_protocol:...`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from functools import cache

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import ApiError

log = logging.getLogger("server.http")


@cache
def head_timeout() -> float:
    """Read once per worker, at its first connection (the app, loaded first, has read `.env`)."""
    from .config import Settings

    return Settings.from_env().header_timeout_seconds


class HeadDeadlineProtocol(HttpToolsProtocol):
    _head_timer: asyncio.TimerHandle | None = None
    _head_begun = False  # a byte of the current request head has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        if self._head_timer is None:  # a kept-alive connection's next request
            self._arm_head_timer()  # (the first request's clock started with the connection)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._head_begun = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm_head_timer()  # (armed only for the rest of a refused request's body)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and self._head_timer is None \
                and not self.transport.is_closing():
            # Answered before its body was all in (a refusal: 401, 403, 413): the rest of the
            # body stands between the connection and its next request head; time it as one.
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(head_timeout(), self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is still being written (a pipelined head arrives behind a long
            # stream): that response is not ours to cut; the head gets another period.
            self._arm_head_timer()
            return
        client = "%s:%d" % self.client if self.client else "-"
        if self._head_begun:
            log.info("request head not received within %.1f s from %s: 408", head_timeout(), client)
            error = ApiError("request_timeout", f"The request head did not arrive within {head_timeout():g} s.")
            body = json.dumps({"error": error.payload()}).encode()
            headers = [*self.server_state.default_headers, (b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            self.transport.write(b"".join([STATUS_LINE[408], *(b"%s: %s\r\n" % h for h in headers), b"\r\n", body]))
        else:
            log.debug("connection idle for %.1f s before any request from %s: closed", head_timeout(), client)
        self.transport.close()
