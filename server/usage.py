"""Token usage and its price.

Cache writes and reads are priced apart from plain input (a cache read costs a tenth of
input, a 5-minute cache write a quarter more): pricing them as input misstates the cost of
cached conversations several times over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def add(self, other: "Usage") -> None:
        for name in FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def total(self) -> int:
        return self.output_tokens + self.prompt_tokens

    @property
    def prompt_tokens(self) -> int:
        """Everything the model read, cached or not: what the context window holds."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_api(cls, usage: Mapping[str, Any] | None) -> "Usage":
        usage = usage or {}
        return cls(*(int(usage.get(name) or 0) for name in FIELDS))


class PriceTable:
    """USD per million tokens, per model; unknown models cost 0."""

    def __init__(self, prices: Mapping[str, Mapping[str, float]]):
        self.prices = {model: dict(p) for model, p in prices.items()}

    def cost(self, model: str, usage: Usage) -> float:
        p = self.prices.get(model)
        if p is None:
            return 0.0
        micro = (usage.input_tokens * p["input"] + usage.output_tokens * p["output"]
                 + usage.cache_creation_input_tokens * p["cache_write"]
                 + usage.cache_read_input_tokens * p["cache_read"])
        return round(micro / 1_000_000, 8)
