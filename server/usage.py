"""Token usage and its price.

Cache writes and reads are priced separately from plain input: a cache read costs a tenth
of input, a 5-minute cache write a quarter more. Getting this wrong over-reports cost by up
to 10x on cached conversations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def add(self, other: "Usage") -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens

    @property
    def total(self) -> int:
        return (self.input_tokens + self.output_tokens + self.cache_creation_input_tokens
                + self.cache_read_input_tokens)

    @property
    def prompt_tokens(self) -> int:
        """Everything the model read, cached or not: what the context window holds."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    def to_dict(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cache_creation_input_tokens": self.cache_creation_input_tokens,
                "cache_read_input_tokens": self.cache_read_input_tokens}

    @classmethod
    def from_api(cls, usage: Mapping[str, Any] | None) -> "Usage":
        usage = usage or {}
        return cls(
            input_tokens=int(usage.get("input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            cache_creation_input_tokens=int(usage.get("cache_creation_input_tokens") or 0),
            cache_read_input_tokens=int(usage.get("cache_read_input_tokens") or 0),
        )


class PriceTable:
    """USD per million tokens, per model; unknown models cost 0 and are flagged."""

    def __init__(self, prices: Mapping[str, Mapping[str, float]]):
        self.prices = {model: dict(p) for model, p in prices.items()}

    def knows(self, model: str) -> bool:
        return model in self.prices

    def cost(self, model: str, usage: Usage) -> float:
        p = self.prices.get(model)
        if p is None:
            return 0.0
        micro = (usage.input_tokens * p["input"] + usage.output_tokens * p["output"]
                 + usage.cache_creation_input_tokens * p["cache_write"]
                 + usage.cache_read_input_tokens * p["cache_read"])
        return round(micro / 1_000_000, 8)
