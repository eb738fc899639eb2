"""Token usage and its price.

Cache writes and reads are priced apart from plain input (a cache read costs a tenth of
input, a 5-minute cache write a quarter more): pricing them as input misstates the cost of
cached conversations several times over. Thinking tokens are part of `output_tokens` (the API
bills them as output); `thinking_tokens` only says how many of them were reasoning. Web searches
are billed per request on top of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# Counted apart from the tokens (shown when non-zero; not kept in the session's totals).
DETAILS = ("thinking_tokens", "web_search_requests", "web_fetch_requests")


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    thinking_tokens: int = 0
    web_search_requests: int = 0
    web_fetch_requests: int = 0

    def add(self, other: "Usage") -> None:
        for name in FIELDS + DETAILS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def total(self) -> int:
        return self.output_tokens + self.prompt_tokens

    @property
    def prompt_tokens(self) -> int:
        """Everything the model read, cached or not: what the context window holds."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    def to_dict(self) -> dict[str, int]:
        out = {name: getattr(self, name) for name in FIELDS}
        for name in DETAILS:
            if value := getattr(self, name):
                out[name] = value
        return out

    def update(self, usage: Mapping[str, Any] | None) -> None:
        """Take the API's (cumulative) usage of one call: `message_start`'s, then `message_delta`'s."""
        for name in FIELDS:
            if (value := (usage or {}).get(name)) is not None:
                setattr(self, name, int(value))
        details = (usage or {}).get("output_tokens_details")
        if isinstance(details, dict) and details.get("thinking_tokens") is not None:
            self.thinking_tokens = int(details["thinking_tokens"])
        servers = (usage or {}).get("server_tool_use")
        if isinstance(servers, dict):
            self.web_search_requests = int(servers.get("web_search_requests") or 0)
            self.web_fetch_requests = int(servers.get("web_fetch_requests") or 0)

    @classmethod
    def from_api(cls, usage: Mapping[str, Any] | None) -> "Usage":
        found = cls()
        found.update(usage)
        return found


class PriceTable:
    """USD per million tokens, per model (unknown models: tokens cost 0), and per web search."""

    def __init__(self, prices: Mapping[str, Mapping[str, float]], web_search_per_1k: float = 10.0):
        self.prices = {model: dict(p) for model, p in prices.items()}
        self.web_search = web_search_per_1k / 1000

    def cost(self, model: str, usage: Usage) -> float:
        p = self.prices.get(model)
        micro = 0.0 if p is None else (
            usage.input_tokens * p["input"] + usage.output_tokens * p["output"]
            + usage.cache_creation_input_tokens * p["cache_write"] + usage.cache_read_input_tokens * p["cache_read"])
        return round(micro / 1_000_000 + usage.web_search_requests * self.web_search, 8)
