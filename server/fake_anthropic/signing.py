"""The fake's opaque thinking tokens: a thinking block's ``signature`` and a redacted block's ``data``.

Both carry an HMAC under a fixed secret, so whatever fake process issued them (a test's, the
harness's subprocess, one restarted in between) verifies them when a client sends them back,
and the same answer always gets the same bytes. They only have to be unforgeable by a client
that changes a block by mistake, not by an attacker.

- signature: base64(tag[12] + HMAC(tag + shown thinking)); ``tag`` is a digest of the thinking
  the model had, which differs from the shown text when the request asked ``display: omitted``.
- data: base64(payload + HMAC(payload)[:16]) around any opaque string.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

_SECRET = b"fake-anthropic/thinking/v1"
_TAG = 12
_DATA_MAC = 16


def _mac(*parts: bytes) -> bytes:
    return hmac.new(_SECRET, b"\0".join(parts), hashlib.sha256).digest()


def _decode(value: object) -> bytes | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def sign(shown: str, thought: str | None = None) -> str:
    """The signature of a thinking block that shows ``shown`` (the model thought ``thought``)."""
    tag = hashlib.sha256((shown if thought is None else thought).encode()).digest()[:_TAG]
    return base64.b64encode(tag + _mac(b"thinking", tag, shown.encode())).decode()


def signed(shown: object, signature: object) -> bool:
    """Whether ``signature`` is this fake's signature of a block showing ``shown``."""
    raw = _decode(signature)
    if raw is None or len(raw) != _TAG + 32 or not isinstance(shown, str):
        return False
    return hmac.compare_digest(raw[_TAG:], _mac(b"thinking", raw[:_TAG], shown.encode()))


def seal(opaque: str) -> str:
    """Redacted thinking ``data`` around ``opaque`` (data this fake sealed already is returned as is)."""
    if sealed(opaque):
        return opaque
    payload = opaque.encode()
    return base64.b64encode(payload + _mac(b"redacted", payload)[:_DATA_MAC]).decode()


def sealed(data: object) -> bool:
    """Whether ``data`` is redacted thinking data this fake issued, unchanged."""
    raw = _decode(data)
    if raw is None or len(raw) < _DATA_MAC:
        return False
    return hmac.compare_digest(raw[-_DATA_MAC:], _mac(b"redacted", raw[:-_DATA_MAC])[:_DATA_MAC])
