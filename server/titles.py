"""TITLE_MODEL: a better title than the first message's, from one short model call after a
session's first answer.

The call runs as a background task once the first turn has committed: it never delays or
fails a turn (a failure is logged and the first message's title stays). It is a model call
like any other: it waits for a slot of MAX_CONCURRENT_UPSTREAM, and its usage and cost go to
the session's totals, the per-key token rate limit and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import anthropic

from . import metrics, sessions
from .errors import ApiError
from .store.base import Store
from .usage import PriceTable, Usage

log = logging.getLogger("server.titles")


class TitleModel:
    def __init__(self, model: str, client: anthropic.AsyncAnthropic, store: Store, prices: PriceTable,
                 gate: Any, listeners: list[Callable[[str, Usage], None]]):
        self.model = model
        self.client = client
        self.store = store
        self.prices = prices
        self.gate = gate  # the engine's UpstreamGate
        self.listeners = listeners  # (principal, usage): the engine's turn listeners
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, session_id: str, principal: str, question: str, answer: str) -> None:
        """Title the session in the background from its first exchange."""
        task = asyncio.create_task(self._title(session_id, principal, question, answer), name=f"title-{session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request(self, question: str, answer: str) -> dict[str, Any]:
        """The Messages API request: the fixed instruction, the first question and answer (cut)."""
        cut = sessions.TITLE_INPUT_CHARS
        text = f"<question>\n{question[:cut]}\n</question>\n<answer>\n{answer[:cut]}\n</answer>"
        return {"model": self.model, "max_tokens": sessions.TITLE_MAX_TOKENS, "system": sessions.TITLE_INSTRUCTION,
                "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}

    async def _title(self, session_id: str, principal: str, question: str, answer: str) -> None:
        try:
            # (ApiError("overloaded") after UPSTREAM_QUEUE_TIMEOUT_SECONDS without a free place)
            response, usage = await self.gate.create(self.client, self.request(question, answer))
            cost = self.prices.cost(self.model, usage)
            metrics.model_usage(self.model, usage, cost)
            for listener in self.listeners:
                listener(principal, usage)
            title = sessions.model_title("".join(b.text for b in response.content if b.type == "text"))
            await self.store.add_model_title(session_id, principal, title, usage, cost)
        except asyncio.CancelledError:
            raise
        except (ApiError, anthropic.APIError) as exc:
            log.warning("no model title for session %s (%s)", session_id, type(exc).__name__)
        except Exception:  # noqa: BLE001 — a title is never worth more than a log line
            log.warning("no model title for session %s", session_id, exc_info=True)

    async def close(self) -> None:
        """Stop the calls still running (shutdown): their sessions keep the first message's title."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
