"""What a model accepts, from the Models API (`GET /v1/models/{id}`), asked once per model per worker.

Thinking types and effort levels differ by model (adaptive thinking, `xhigh` effort...). The API's own
answer is the one source that stays true as models change, so a request asking for what the model does
not take gets a clear `thinking_not_supported` instead of the upstream's 400. When the lookup cannot be
made (an unknown model id, the Models API unreachable), the call goes ahead and the API decides.
"""

from __future__ import annotations

import logging
from typing import Any

import anthropic
import httpx2

from .errors import ApiError

log = logging.getLogger("server.capabilities")
LOOKUP_TIMEOUT_SECONDS = 5.0


class ModelCapabilities:
    def __init__(self, client: anthropic.AsyncAnthropic):
        self.client = client
        self._known: dict[str, dict[str, Any] | None] = {}  # model -> its `capabilities` (None: not known)

    async def check(self, model: str, thinking: dict[str, Any] | None, effort: str | None) -> None:
        """Raise `thinking_not_supported` when `model` refuses this thinking type or effort level."""
        caps = await self._capabilities(model)
        if not caps:
            return
        kind = (thinking or {}).get("type")
        types = (caps.get("thinking") or {}).get("types") or {}
        if kind and not _supported(types.get(kind), default=True):
            raise ApiError("thinking_not_supported", f"{model} does not accept thinking of type '{kind}'.",
                           field="thinking")
        levels = caps.get("effort") or {}
        if effort and levels and not (levels.get("supported", True) and _supported(levels.get(effort), default=False)):
            raise ApiError("thinking_not_supported", f"{model} does not accept effort '{effort}'.", field="effort")

    async def _capabilities(self, model: str) -> dict[str, Any] | None:
        if model in self._known:
            return self._known[model]
        try:
            response = await self.client.get(f"/v1/models/{model}", cast_to=httpx2.Response,  # type: ignore[arg-type]
                                             options={"timeout": LOOKUP_TIMEOUT_SECONDS, "max_retries": 0})
            caps = response.json().get("capabilities")
        except anthropic.NotFoundError:
            caps = None  # (a model the Models API does not list: the Messages API decides)
        except Exception as exc:  # noqa: BLE001 — unreachable now: asked again by the next turn
            log.info("model capabilities of %s unknown (%s); the API will decide", model, type(exc).__name__)
            return None
        self._known[model] = caps if isinstance(caps, dict) else None
        return self._known[model]


def _supported(entry: Any, default: bool) -> bool:
    return bool(entry.get("supported", default)) if isinstance(entry, dict) else default
