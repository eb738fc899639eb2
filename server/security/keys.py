"""Who is calling (README "Security"): API keys, WebSocket tickets, and the principal they name.

A key (plaintext, or `sha256:<hex>`) comes as `Authorization: Bearer`, or on a WebSocket as the
subprotocol `bearer.<key>` next to `agent`, or is swapped for a single-use `?ticket=`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import NamedTuple

from starlette.requests import HTTPConnection

ANONYMOUS = "anonymous"
SCOPE_KEY = "agent.principal"
WS_SUBPROTOCOL = "agent"
BEARER_SUBPROTOCOL = "bearer."


def principal_of(conn: HTTPConnection) -> str:
    return conn.scope.get(SCOPE_KEY) or ANONYMOUS


def principal_for_digest(digest: bytes) -> str:
    return "key:" + digest.hex()[:12]


def parse_key_entry(entry: str) -> bytes:
    """A configured key, plaintext or `sha256:<64 hex>`, as its sha256 digest (ValueError if bad)."""
    if entry.lower().startswith("sha256:"):
        hex_part = entry[7:].strip().lower()
        if len(hex_part) != 64 or any(c not in "0123456789abcdef" for c in hex_part):
            raise ValueError("a sha256: entry needs exactly 64 hex digits")
        return bytes.fromhex(hex_part)
    if len(entry) < 16:
        raise ValueError("plaintext keys must be at least 16 characters (or give sha256:<hex>)")
    if any(c.isspace() for c in entry):
        raise ValueError("keys must not contain whitespace")
    return hashlib.sha256(entry.encode()).digest()


class KeyRing:
    """The configured client keys, as digests; answers `principal or None` for a presented key."""

    def __init__(self, entries: tuple[str, ...]):
        self._digests = [parse_key_entry(e) for e in entries]

    def __len__(self) -> int:
        return len(self._digests)

    def authenticate(self, presented: str | None) -> str | None:
        if not presented or len(presented) > 4096:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        # A list, not any(): no early exit, so the time does not depend on which key matched.
        return principal_for_digest(digest) if any([hmac.compare_digest(digest, k) for k in self._digests]) else None


# -- WebSocket tickets -------------------------------------------------------------------
class Ticket(NamedTuple):
    principal: str
    expires: int
    nonce: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TicketSigner:
    """`<payload>.<hmac>`: payload = base64url JSON {p: principal, e: expiry (unix s), n: nonce}."""

    def __init__(self, secret: bytes, ttl_seconds: int):
        self._secret = secret
        self.ttl = ttl_seconds

    def issue(self, principal: str, now: float | None = None) -> tuple[str, Ticket]:
        ticket = Ticket(principal, int((now or time.time()) + self.ttl), secrets.token_urlsafe(12))
        payload = _b64(json.dumps({"p": ticket.principal, "e": ticket.expires, "n": ticket.nonce},
                                  separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}", ticket

    def verify(self, token: str | None, now: float | None = None) -> Ticket | None:
        """The ticket if the signature is ours and it has not expired (single use is the caller's)."""
        if not token or len(token) > 1024 or token.count(".") != 1:
            return None
        payload, sig = token.split(".")
        if not hmac.compare_digest(self._sign(payload).encode(), sig.encode()):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            ticket = Ticket(str(data["p"]), int(data["e"]), str(data["n"]))
        except (ValueError, KeyError, TypeError):
            return None
        return ticket if ticket.expires >= (now or time.time()) else None

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())


def ticket_secret(configured: str | None, keys: KeyRing, anthropic_key: str | None) -> bytes:
    """AGENT_TICKET_SECRET, else one derived from secrets every worker shares (the keys and
    ANTHROPIC_API_KEY), so tickets work across workers without extra configuration."""
    if configured:
        return hashlib.sha256(b"agent-ws-ticket:" + configured.encode()).digest()
    material = b"agent-ws-ticket-derived:" + b"".join(sorted(keys._digests)) + b":" + (anthropic_key or "").encode()
    return hashlib.sha256(material).digest()
