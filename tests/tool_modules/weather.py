"""Tools of every shape `@tool` takes: typed parameters (with `Annotated` descriptions and
defaults), a pydantic model parameter, async, content blocks, errors, a short timeout, and
parameter names that a pydantic field could not have."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.tools import ToolResult, tool

# a 1x1 red PNG
RED_DOT = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c49444154"
    "08d763f8cfc000000301010018dd8db00000000049454e44ae426082")).decode()


@tool
def forecast(city: Annotated[str, Field(description="City name, e.g. 'Paris'", min_length=1)],
             days: Annotated[int, Field(ge=1, le=7)] = 1,
             unit: Literal["C", "F"] = "C") -> dict:
    """Weather forecast for a city.

    Made up, deterministic: for tests."""
    return {"city": city, "days": days, "unit": unit, "sky": "clear", "high": 21 if unit == "C" else 70}


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")

    term: str = Field(min_length=1, description="What to look for")
    limit: int = Field(default=2, ge=1, le=5)


@tool
def search(query: Query) -> list[str]:
    """Search the test catalogue; returns matching titles."""
    return [f"{query.term} #{i}" for i in range(1, query.limit + 1)]


@tool(name="slow-echo", description="Echo the text after a delay (async).", timeout=0.5)
async def slow_echo(text: str, delay: float = 0.0) -> str:
    await asyncio.sleep(delay)
    return text


@tool
def red_dot() -> ToolResult:
    """Draw a red dot: an image."""
    return ToolResult([{"type": "text", "text": "a red dot"},
                       {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": RED_DOT}}])


@tool
def refuse(reason: str) -> ToolResult:
    """Always refuses, as an error the model sees."""
    return ToolResult(f"refused: {reason}", is_error=True)


@tool
def explode(message: str) -> str:
    """Raises: the model sees the exception."""
    raise RuntimeError(message)


@tool
def shadowing(json: str, schema: int = 0, model_config: bool = False) -> dict:
    """Parameters named like pydantic's own attributes."""
    return {"json": json, "schema": schema, "model_config": model_config}
