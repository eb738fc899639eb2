"""The turn engine: one agent turn, whatever transport asked for it.

A turn runs as its own task, independent of the connection that started it: a dropped
client does not abort it (unless it asked to), any worker can follow it through the event
log, and it commits once, fenced by the session lock. Transports call `start`, `follow`
and `cancel`; they never talk to the store or the SDK.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Callable, NamedTuple

import anthropic

from . import compaction, context, metrics, sessions, structured, tracing
from .capabilities import ModelCapabilities
from .config import Settings
from .errors import ApiError, from_exception, from_upstream, store_unavailable
from .events import Event, encode, unlogged
from .requests import TurnRequest, interleaved_beta, parse_tool_answer, thinking_params
from .store.base import (ABANDONED_SEQ, ANSWERED, Busy, Duplicate, LogBatch, NotFound, RewindRefused, SessionMeta,
                         SessionPage, SessionView, Started, Store, StoredMessage, TurnCommit, new_id, valid_id)
from .titles import TitleModel
from .tools import ToolSet, server_tools
from .tools.registry import ToolOutcome, invalid_input
from .turns import Housekeeper, Turn
from .upstream import RawJSON, TextDelta, open_stream
from .usage import PriceTable, Usage

log = logging.getLogger("server.engine")
turn_log = logging.getLogger("server.turn")

INTERRUPTED_FIELDS = ('"code":"interrupted","message":"The turn was interrupted (the worker running it stopped); '
                      'send the message again.","retryable":true')
INTERRUPT_WAIT_SECONDS = 10.0
REMOTE_POLL_MS = 1000
LINK_WAIT_MS = 500  # (tracing) longest wait for a remote turn's first logged event, to link to its span
INTERLEAVED_THINKING = "interleaved-thinking-2025-05-14"
# A turn waiting for tool answers also reads them every this many seconds: the notice that one
# arrived (pub/sub) is lost while a worker's listener resubscribes.
ANSWER_POLL_SECONDS = 2.0
WAIT_KEY_MARGIN_SECONDS = 60  # the store keeps a wait this much longer than the turn waits
# stop_reason -> `finish` of turn_end (an unknown future reason: "unknown"; pause_turn is continued).
FINISH = {"end_turn": "complete", "stop_sequence": "complete", "tool_use": "complete", "max_tokens": "truncated",
          "model_context_window_exceeded": "truncated", "refusal": "refused"}
_unknown_seen: set[str] = set()  # (block and delta types this server does not know: logged once each)


class UpstreamGate(asyncio.Semaphore):
    """At most `limit` model calls at once in this worker; a caller waits up to `timeout`
    seconds for a free place, then gets `overloaded` (503, retryable). Protects the quota."""

    def __init__(self, limit: int, timeout: float):
        super().__init__(limit)
        self.limit = limit
        self.timeout = timeout

    @property
    def in_use(self) -> int:
        return self.limit - self._value  # (for metrics/tests)

    async def acquire(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                return await super().acquire()
        except TimeoutError:
            raise ApiError("overloaded", "The server is at capacity (too many model calls in progress); "
                           "retry shortly.", retry_after=1) from None

    async def create(self, client: anthropic.AsyncAnthropic, params: dict[str, Any]) -> tuple[Any, Usage]:
        """One non-streamed model call (a title, a summary) in a free place: its response and usage."""
        await self.acquire()
        try:
            response = await client.messages.create(**params)
        finally:
            self.release()
        return response, Usage.from_api(response.usage.model_dump())  # (the parser a turn's calls use)


TurnHandle = NamedTuple("TurnHandle", [("session_id", str), ("turn_id", str)])


@dataclass
class _Progress:
    """What a turn has produced so far: enough to commit a partial answer on cancel."""
    messages: list[dict[str, Any]]
    usage: Usage = field(default_factory=Usage)
    model_calls: int = 0
    request_ids: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)  # the current answer's blocks
    stop_reason: str | None = None
    stop_sequence: str | None = None
    stop_details: Any = None
    container: str | None = None  # code execution's container, reused by the turn's next calls
    server_calls: dict[str, str] = field(default_factory=dict)  # server_tool_use id -> tool name
    last_prompt_tokens: int = 0
    last_prompt_chars: int = 0
    first_token_at: float | None = None
    structured: Any = None
    client_tools: dict[str, dict[str, Any]] = field(default_factory=dict)  # the request's, by name
    problems: dict[str, str] = field(default_factory=dict)  # tool_use id -> why its input is invalid
    call_span: Any = None  # (tracing) the model call's span while a failure may interrupt it; `_run` ends it
    # A rewind (edit, regenerate): where the commit cuts the history first, and the turns it replaces.
    cut: int | None = None
    kept_turns: int = 0
    rewound: list[str] | None = None
    # Compaction: the summary the model sees in place of history[:summary_upto]; `summary_changed`:
    # the commit writes it (a new one, or None: a rewind took away what it covered).
    summary: str | None = None
    summary_upto: int = 0
    summary_changed: bool = False
    extra_usage: Usage | None = None  # summary calls (their cost is in extra_cost)
    extra_cost: float = 0.0


class Engine:
    def __init__(self, settings: Settings, client: anthropic.AsyncAnthropic, store: Store,
                 tools: ToolSet, prices: PriceTable):
        self.settings = settings
        self.client = client
        self.store = store
        self.tools = tools
        self.prices = prices
        self.turns: dict[str, Turn] = {}
        metrics.setup()  # (at worker startup: the engine is built in the lifespan)
        self._tools_version: Any = object()  # (of the tools encoded below: none yet)
        self._tool_defs: list[dict[str, Any]] = []
        self._tools_encoded: tuple[RawJSON | None, int] = (None, 0)
        self.approval_required = frozenset(settings.tools_requiring_approval)
        self.mcp_servers: Any = None  # (set by the lifecycle when MCP_SERVERS is: their states for /ready)
        self.housekeeper = Housekeeper(store, settings)
        self.store_system = "redis" if settings.redis_url else "memory"  # (commit spans, as /health says it)
        self.accepting = True
        self.stopping = False  # set once draining is over: remote followers end too
        self.upstream_gate = UpstreamGate(settings.max_concurrent_upstream, settings.upstream_queue_timeout_seconds)
        self.capabilities = ModelCapabilities(client)
        self.turn_listeners: list[Callable[[str, Usage], None]] = []  # (principal, usage) per finished turn
        self._recancels: set[asyncio.Task[None]] = set()
        # TITLE_MODEL (never in offline mode: the bundled model would only echo the question)
        self.titles = TitleModel(settings.title_model, client, store, prices, self.upstream_gate, self.turn_listeners) \
            if settings.title_model and not settings.offline else None

    def _tools_param(self, req: TurnRequest) -> tuple[RawJSON | None, int]:
        """The `tools` to send (JSON, the cache breakpoint on the last) and their size in characters.
        Encoded once per version of the tool list (MCP servers change it); a request's client
        tools come last, encoded with its turn."""
        defs = self._server_tool_defs()
        if not req.client_tools:
            return self._tools_encoded
        return self._encode_tools([*defs, *req.client_tools.values()])

    def _server_tool_defs(self) -> list[dict[str, Any]]:
        """This server's tool definitions (its own, MCP, the API's server tools), as of now: derived
        and encoded again only when the tool list's version changed."""
        version = self.tools.version if self.tools is not None else None
        if version != self._tools_version:
            self._tool_defs = [*(self.tools.definitions() if self.tools is not None else []),
                               *server_tools.definitions(self.settings)]
            self._tools_encoded = self._encode_tools(self._tool_defs)
            self._tools_version = version
        return self._tool_defs

    def _encode_tools(self, defs: list[dict[str, Any]]) -> tuple[RawJSON | None, int]:
        if not defs:
            return None, 0
        sent = context.tool_definitions(defs, self.settings.prompt_caching)
        return (RawJSON(json.dumps(sent, ensure_ascii=False, separators=(",", ":")).encode()),
                sum(len(json.dumps(t)) for t in defs))

    async def start(self, req: TurnRequest, principal: str) -> TurnHandle:
        """Lock the session and start the turn; raises ApiError (busy, not found, ...)."""
        if not self.accepting:
            raise ApiError("server_restarting")
        if req.client_tools:
            clash = sorted(set(req.client_tools) & {t["name"] for t in self._server_tool_defs() if "name" in t})
            if clash:
                raise ApiError("invalid_request", f"`client_tools`: {', '.join(clash)} is the name of a tool of "
                               "this server; client tools need names of their own.", field="client_tools")
        create = (req.session_id is None or req.create_if_missing) and req.rewind is None
        session_id = req.session_id or new_id()
        title = sessions.message_title(req.user_message()) if create else None  # (a new session's, at once)
        deadline = time.monotonic() + INTERRUPT_WAIT_SECONDS
        while True:
            turn_id = new_id()
            result = await self.store.begin_turn(session_id, turn_id, owner=principal, create=create,
                                                 message_id=req.message_id, title=title, rewind=req.rewind,
                                                 regenerate=req.content is None)
            if isinstance(result, Started):
                break
            if isinstance(result, RewindRefused):
                raise ApiError(result.reason)
            if isinstance(result, Duplicate):
                if tracing.enabled:
                    await self.link_turn(session_id, result.turn_id)
                return TurnHandle(session_id, result.turn_id)  # an idempotent retry joins it
            if isinstance(result, NotFound):
                if create and req.session_id is not None:  # create_if_missing: it exists, continue it
                    create = False
                    continue
                raise ApiError("session_not_found")
            assert isinstance(result, Busy)
            if req.on_busy != "interrupt":
                raise ApiError("session_busy", turn_id=result.running_turn_id)
            if time.monotonic() > deadline:
                raise ApiError("session_busy", "The running turn did not stop in time.",
                               turn_id=result.running_turn_id)
            await self.store.publish_cancel(result.running_turn_id)
            await asyncio.sleep(0.05)
        if result.stale_turn_id:
            await self.store.abandon_turn(session_id, result.stale_turn_id, INTERRUPTED_FIELDS)
        turn = Turn(self.housekeeper, session_id, turn_id)
        if tracing.enabled:  # the turn's span: a child of this request's (or WebSocket frame's)
            turn.span = tracing.start_turn(session_id, turn_id, req.model, principal)
            turn.traceparent = tracing.traceparent(turn.span)
        self.turns[turn_id] = turn
        turn.task = asyncio.create_task(self._run(turn, req, result, principal), name=f"turn-{turn_id}")
        metrics.turn_started()
        return TurnHandle(session_id, turn_id)

    async def link_turn(self, session_id: str, turn_id: str) -> None:
        """(Tracing on) Link the current span, of a request following a turn it did not start (a
        resume, an idempotent retry), to the turn's span: kept by the turn here, else read from the
        `traceparent` of its turn_start event in the log (the turn runs on another worker)."""
        turn = self.turns.get(turn_id)
        parent = turn.traceparent if turn is not None else None
        if turn is None:
            try:
                events = await self.store.read_events(session_id, turn_id, 0, 0)
                if not events and await self.store.lock_holder(session_id) == turn_id:
                    # Running elsewhere, its first events not flushed yet: they are at most a flush away.
                    events = await self.store.read_events(session_id, turn_id, 0, LINK_WAIT_MS)
            except Exception:  # noqa: BLE001 — a missing link is no reason to fail the request
                return
            if events and events[0].type == "turn_start":
                parent = json.loads(events[0].data).get("traceparent")
        if parent:
            tracing.link_current(parent, turn_id)

    def follow(self, session_id: str, turn_id: str, after_seq: int = 0) -> AsyncGenerator[list[Event], None]:
        """Events of a turn after `after_seq`, from memory if it runs here, else from the
        store's log (any worker). Ends after the terminal event. `[]` is a heartbeat tick."""
        turn = self.turns.get(turn_id)
        if turn is not None and turn.session_id == session_id:
            return turn.follow(after_seq)
        return self._follow_remote(session_id, turn_id, after_seq)

    async def _follow_remote(self, session_id: str, turn_id: str, after_seq: int) -> AsyncGenerator[list[Event], None]:
        block_ms = int(min(self.settings.heartbeat_seconds * 1000, REMOTE_POLL_MS))
        quiet_since = time.monotonic()
        try:
            while not self.stopping:
                batch = await self.store.read_events(session_id, turn_id, after_seq, block_ms)
                if batch:
                    quiet_since = time.monotonic()
                    after_seq = batch[-1].seq
                    yield batch
                    if batch[-1].terminal:
                        break
                    continue
                if await self.store.lock_holder(session_id) != turn_id:
                    # Finished (its terminal event is in the log by now) or its worker died.
                    if (await self.store.read_events(session_id, turn_id, after_seq, 0)
                            or await self.store.abandon_turn(session_id, turn_id, INTERRUPTED_FIELDS)):
                        continue
                    break  # the log already ends with its terminal event: nothing after `after_seq`
                if time.monotonic() - quiet_since >= self.settings.heartbeat_seconds:
                    quiet_since = time.monotonic()
                    yield []
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            # The log cannot be read now: the client resumes from its last event later.
            yield [unlogged(after_seq, "error", from_exception(exc).payload())]
            return
        if self.stopping:
            # Shutting down while another worker runs the turn: the client resumes elsewhere,
            # after the last real event it saw (the notice has no id: it is not in the log).
            yield [unlogged(after_seq, "error", ApiError("server_restarting").payload())]

    async def cancel(self, session_id: str, principal: str) -> str | None:
        """Cancel the session's running turn wherever it runs; returns its id (or None)."""
        turn_id, running = _found(await self.store.last_turn(session_id, principal))
        if running:
            await self.cancel_turn(session_id, turn_id)
        return turn_id if running else None

    async def cancel_turn(self, session_id: str, turn_id: str) -> None:
        """Cancel the turn wherever it runs. Pub/sub does not keep a message for a listener
        that is resubscribing (its Redis node failed over or restarted), so a cancel meant for
        another worker is published again a few times, for about 5 s, while the turn still
        holds the session's lock."""
        if self.cancel_local(turn_id):
            return
        await self.store.publish_cancel(turn_id)
        task = asyncio.create_task(self._cancel_again(session_id, turn_id), name=f"recancel-{turn_id}")
        self._recancels.add(task)
        task.add_done_callback(self._recancels.discard)

    async def _cancel_again(self, session_id: str, turn_id: str) -> None:
        for delay in (0.5, 1.0, 1.5, 2.0):
            await asyncio.sleep(delay)
            try:
                if await self.store.lock_holder(session_id) != turn_id:
                    return  # it stopped (or its lock expired)
                await self.store.publish_cancel(turn_id)
            except Exception as exc:  # noqa: BLE001 — the store failing: try again at the next step
                if not store_unavailable(exc):
                    raise

    async def resumable_turn(self, session_id: str, principal: str) -> tuple[str | None, bool]:
        """The session's running or recent turn (its log not yet expired), and whether it runs."""
        turn_id, running = _found(await self.store.last_turn(session_id, principal))
        if turn_id is not None and not running and not await self.store.has_log(session_id, turn_id):
            return None, False
        return turn_id, running

    async def session(self, session_id: str, principal: str) -> SessionView:
        return _found(await self.store.get_session(session_id, principal))

    async def list_sessions(self, principal: str, limit: int, after: tuple[int, str] | None) -> SessionPage:
        """The principal's sessions, newest activity first (a page after `after`)."""
        return await self.store.list_sessions(principal, limit, after)

    async def rename(self, session_id: str, principal: str, title: str) -> SessionMeta:
        """The owner's title: kept over the first message's and the title model's."""
        return _found(await self.store.rename_session(session_id, principal, title))

    async def delete(self, session_id: str, principal: str) -> None:
        """Forget the session; a turn still running on it is cancelled (wherever it runs)."""
        turn_id, running = _found(await self.store.last_turn(session_id, principal))
        if not await self.store.delete_session(session_id, principal):
            raise ApiError("session_not_found")
        if running:  # (a running turn has an id)
            await self.cancel_turn(session_id, turn_id)

    async def drain(self, grace: float) -> None:
        """Stop taking turns, give running ones `grace` seconds, then stop them."""
        self.accepting = False
        deadline = time.monotonic() + grace
        while self.turns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for turn in list(self.turns.values()):
            self.cancel_local(turn.turn_id, "server_restarting")
        if self.turns:  # (a turn's task is set as it is registered)
            await asyncio.wait([t.task for t in self.turns.values()], timeout=5.0)
        for task in self._recancels:
            task.cancel()
        if self.titles is not None:
            await self.titles.close()
        self.stopping = True

    def cancel_local(self, turn_id: str, reason: str = "cancelled") -> bool:
        """Cancel the turn if it runs here; also called for every cancel any worker publishes."""
        turn = self.turns.get(turn_id)
        if turn is None or turn.finishing:  # (its task is set as it is registered; `done` follows `finishing`)
            return False
        if turn.cancel_reason is None:
            turn.cancel_reason = reason
            turn.task.cancel()
        return True

    def on_notice(self, message: str) -> None:
        """A notice any worker published (the store calls this on every worker): a turn to
        cancel, or (ANSWERED + turn id) a turn whose waiting tool calls got an answer."""
        if message.startswith(ANSWERED):
            turn = self.turns.get(message[len(ANSWERED):])
            if turn is not None and turn.answered is not None:
                turn.answered.set()
        else:
            self.cancel_local(message)

    async def pending_tools(self, session_id: str, principal: str) -> tuple[str | None, dict[str, str]]:
        """(the running turn, {tool_use_id: "approval" | "client"} of its calls waiting for an answer)."""
        return _found(await self.store.waiting_tools(session_id, principal))

    async def answer_tools(self, session_id: str, principal: str, answers: list[Any]) -> str:
        """Record answers to a turn's waiting tool calls, from any worker, and wake the turn:
        `{"tool_use_id", "approved", "reason"?}` decides an approval, `{"tool_use_id", "output",
        "is_error"?}` is a client tool's result. Returns the turn's id. Only the session's owner
        may answer (else 404); a call no running turn waits for, or one already answered, is
        409 `tool_call_not_pending`."""
        checked = [parse_tool_answer(answer, self.settings) for answer in answers]
        if not checked:
            raise ApiError("invalid_request", "No tool answer given.")
        turn_id = None
        try:
            for call_id, kind, data in checked:
                status, detail = await self.store.answer_tool(session_id, principal, call_id, kind, data)
                if status == "not_found":
                    raise ApiError("session_not_found")
                if status == "wrong_kind":
                    wanted = "an approval (`approved`)" if detail == "approval" else "a result (`output`)"
                    raise ApiError("invalid_request", f"Tool call {call_id} waits for {wanted}.",
                                   field="approved" if kind == "approval" else "output")
                if status != "ok":
                    raise ApiError("tool_call_not_pending", f"No running turn of this session waits for an answer "
                                   f"to tool call {call_id}" + (" any more (it was answered)." if status == "answered"
                                                                 else "."))
                turn_id = detail
        finally:
            if turn_id is not None:
                await self._wake(turn_id)
        assert turn_id is not None
        return turn_id

    async def _wake(self, turn_id: str) -> None:
        turn = self.turns.get(turn_id)
        if turn is not None:
            if turn.answered is not None:
                turn.answered.set()
        else:
            await self.store.notify_answered(turn_id)

    async def _run(self, turn: Turn, req: TurnRequest, started: Started, principal: str) -> None:
        progress = _Progress(messages=[_user_message(req, started)], client_tools=req.client_tools or {},
                             summary=started.meta.summary, summary_upto=started.meta.summary_upto)
        if started.cut is not None:  # a rewind: the model sees only what is kept
            progress.cut, progress.kept_turns, progress.rewound = started.cut, started.kept_turns, started.rewound
            started.history = started.history[:started.cut]
            if progress.summary_upto > started.cut:  # the summary covers what goes: dropped
                progress.summary, progress.summary_upto, progress.summary_changed = None, 0, True
        outcome, error = "completed", None
        if turn.span is not None:
            tracing.activate(turn.span)  # (this task's context: its log lines and spans are the turn's)
        try:
            await self._loop(turn, req, started, progress)
        except asyncio.CancelledError:
            outcome = turn.cancel_reason or "cancelled"
        except ApiError as exc:
            outcome, error = "failed", exc
        except Exception as exc:  # noqa: BLE001 — every failure must end the turn cleanly
            outcome, error = "failed", from_upstream(exc)
            metrics.upstream_error(error.code)
        upstream_id = error.extra.get("upstream_request_id") if error else None
        if upstream_id and upstream_id not in progress.request_ids:
            progress.request_ids.append(upstream_id)
        if progress.call_span is not None:  # the model call this failure (or cancel) interrupted
            tracing.end_span(progress.call_span, error.code if error else None,
                             {"anthropic.request_id": upstream_id} if upstream_id else None)
        try:
            outcome, error = await self._finish(turn, req, progress, outcome, error, principal)
        except Exception as exc:  # the commit itself failed: the store did not answer (or a bug)
            failure = from_exception(exc)
            outcome, error = "failed", failure
            log.warning("turn %s could not be committed (%s)", turn.turn_id, failure.code)
            turn.publish_final(turn.terminal_event("error", failure.payload()))
        else:
            first = started.meta.message_count == 0 or progress.cut == 0  # (or the first turn, edited)
            if (self.titles is not None and outcome == "completed" and first
                    and started.meta.title_source == "message"):  # the first answer of a session: a better title
                question = sessions.head(sessions.text_of(progress.messages[0]["content"]), sessions.TITLE_INPUT_CHARS)
                self.titles.schedule(turn.session_id, principal, question or started.meta.title or "",
                                     "".join(progress.text))
        finally:
            self.turns.pop(turn.turn_id, None)
            if turn.span is not None:  # (the turn's span ends with the turn, whoever still follows it)
                tracing.end_turn(turn.span, outcome, error.code if error else None)

    async def _loop(self, turn: Turn, req: TurnRequest, started: Started, progress: _Progress) -> None:
        s = self.settings
        if (started.meta.message_count if progress.cut is None else progress.cut) + 2 > s.max_session_messages:
            raise ApiError("session_full")
        if s.session_token_budget and started.meta.usage.total >= s.session_token_budget:
            raise ApiError("budget_exceeded", f"This session has used {started.meta.usage.total} of its "
                                              f"{s.session_token_budget} tokens.")
        system = req.system if req.system is not None else s.system_prompt
        if req.response_schema is not None:
            system = f"{system}\n\n{structured.instruction(req.response_schema)}".strip()
        thinking = thinking_params(req, s)
        if thinking:
            await self.capabilities.check(req.model, thinking.get("thinking"),
                                          thinking.get("output_config", {}).get("effort"))
        betas = INTERLEAVED_THINKING if interleaved_beta(req, s) else None
        correction_at: int | None = None
        ratio = context.chars_per_token(started.meta.last_input_tokens, started.meta.last_input_chars)
        tools_json, tool_chars = self._tools_param(req)
        fixed_chars = len(system) + tool_chars
        paused = False
        for iteration in range(s.max_tool_iterations):
            window, est_chars = await self._window(turn, req, progress, started.history + progress.messages,
                                                   fixed_chars, ratio)
            if s.session_token_budget:
                used = started.meta.usage.total + progress.usage.total + (progress.extra_usage or Usage()).total
                if used + int(est_chars / ratio) > s.session_token_budget:
                    raise ApiError("budget_exceeded",
                                   f"This turn would exceed the session's {s.session_token_budget}-token budget.")
            sys_param, sent = context.with_breakpoints(system, window, s.prompt_caching)
            params: dict[str, Any] = {"model": req.model, "max_tokens": req.max_tokens, "messages": sent}
            if sys_param:
                params["system"] = sys_param
            if tools_json is not None:
                params["tools"] = tools_json
            if thinking:
                params.update(thinking)
            if progress.container:
                params["container"] = progress.container
            # A paused answer (`pause_turn`) is sent back as it is and goes on in the same message.
            progress.blocks = progress.messages[-1]["content"] if paused else []
            await self._call_model(turn, req, params, progress, betas)
            progress.last_prompt_chars = est_chars
            if not paused:
                progress.messages.append({"role": "assistant", "content": progress.blocks})
            paused = progress.stop_reason == "pause_turn"
            if paused:
                continue
            if progress.stop_reason != "tool_use":
                if req.response_schema is None:
                    return
                answer = "".join(b["text"] for b in progress.blocks if b["type"] == "text")
                value, problem = structured.parse(answer, req.response_schema)
                if problem is None:
                    if correction_at is not None:  # keep the history clean: drop the failed try
                        del progress.messages[correction_at - 1:correction_at + 1]
                    progress.structured = value
                    turn.emit("structured_output", {"data": value})
                    return
                if correction_at is not None:
                    raise ApiError("structured_output_invalid",
                                   f"The answer did not match the schema after one retry: {problem}")
                correction_at = len(progress.messages)
                progress.messages.append(structured.correction(problem))
                progress.text = []
                turn.emit("structured_output_retry", {"error": problem})
                continue
            uses = [b for b in progress.blocks if b["type"] == "tool_use"]
            calls = [(b["id"], b["name"], b["input"]) for b in uses]
            results = await self._run_calls(turn, progress, calls)
            progress.messages.append({"role": "user", "content": [o.tool_result_block() for o in results]})
        # The model kept asking for tools (or pausing): end with an assistant message so history stays valid.
        stopped = {"type": "text", "text": "[Stopped: the tool iteration limit was reached.]"}
        if paused:
            progress.messages[-1]["content"].append(stopped)
        else:
            progress.messages.append({"role": "assistant", "content": [stopped]})
        raise ApiError("max_iterations", f"The model asked for tools {s.max_tool_iterations} times in a row.")

    async def _window(self, turn: Turn, req: TurnRequest, progress: _Progress, messages: list[Any],
                      fixed_chars: int, ratio: float) -> tuple[list[Any], int]:
        """The messages a model call sends, and their estimated size with the system prompt and
        tools (`fixed_chars`): the session's summary (if any) and what follows it, whole turns
        dropped from the front past CONTEXT_TOKEN_BUDGET, or (CONTEXT_STRATEGY=summarize) the
        older ones summarised first. A failed summary call never fails the turn: it trims."""
        s = self.settings
        if not progress.summary:  # (the common case: no list built, nothing summarised yet)
            start, est_chars = context.window(messages, fixed_chars, s.context_token_budget, ratio)
            if start == 0 or s.context_strategy == "trim":
                return messages[start:] if start else messages, est_chars
        head = [compaction.summary_message(progress.summary)] if progress.summary else []
        covered = progress.summary_upto
        base = fixed_chars + sum(context.message_chars(m) for m in head)
        start, est_chars = context.window(messages[covered:], base, s.context_token_budget, ratio)
        if start == 0 or s.context_strategy == "trim":
            return [*head, *messages[covered + start:]], est_chars
        upto = compaction.split_point(messages, covered, fixed_chars, s.context_token_budget, ratio,
                                      s.summary_max_tokens)
        if upto is None:
            return [*head, *messages[covered + start:]], est_chars
        self._open(turn, req, progress)  # (clients hear of the turn while the summary is written)
        try:
            summary = await self._summarize(req, progress, messages[covered:upto], int(s.context_token_budget * ratio))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 — compaction is never worth a failed turn
            if isinstance(exc, anthropic.APIStatusError) and exc.request_id:
                progress.request_ids.append(exc.request_id)
            log.warning("turn %s: the summary call failed (%s): older turns are left out instead", turn.turn_id,
                        exc.code if isinstance(exc, ApiError) else type(exc).__name__)
            return [*head, *messages[covered + start:]], est_chars
        progress.summary, progress.summary_upto, progress.summary_changed = summary, upto, True
        turn.emit("context_compacted", {"covers_messages": upto, "summary_chars": len(summary)})
        head = [compaction.summary_message(summary)]
        window = [*head, *messages[upto:]]
        return window, fixed_chars + sum(context.message_chars(m) for m in window)

    async def _summarize(self, req: TurnRequest, progress: _Progress, messages: list[Any], budget_chars: int) -> str:
        """One summary call (not streamed) of `messages` and the previous summary; its usage and
        cost count in the turn's."""
        model = self.settings.summary_model or req.model
        params = compaction.request(model, self.settings.summary_max_tokens, progress.summary, messages, budget_chars)
        response, usage = await self.upstream_gate.create(self.client, params)
        if progress.extra_usage is None:
            progress.extra_usage = Usage()
        progress.extra_usage.add(usage)
        progress.extra_cost += self.prices.cost(model, usage)
        progress.model_calls += 1
        if request_id := getattr(response, "_request_id", None):
            progress.request_ids.append(request_id)
        summary = "".join(b.text for b in response.content if b.type == "text").strip()
        if not summary:
            raise ValueError("the summary call answered no text")
        return summary

    async def _run_calls(self, turn: Turn, progress: _Progress, calls: list[tuple[str, str, Any]]) -> list[ToolOutcome]:
        """Run the answer's tool calls and send their `tool_result` events; results in call order.
        Calls that need nobody run first; then calls to client tools, and to tools that need
        approval, are announced and waited for (`_wait_for_answers`): a denied call or a client
        tool's result becomes its tool_result without running anything here."""
        waits = {call_id: "client" if name in progress.client_tools else "approval"
                 for call_id, name, _input in calls if call_id not in progress.problems
                 and (name in progress.client_tools or name in self.approval_required)}
        outcomes: dict[str, ToolOutcome] = {}
        await self._run_now(turn, progress, [call for call in calls if call[0] not in waits], outcomes)
        if waits:
            answers = await self._wait_for_answers(turn, calls, waits)
            approved = []
            for call_id, name, raw_input in calls:
                answer = answers.get(call_id)
                if waits.get(call_id) == "client":
                    self._record(turn, progress, outcomes, _client_outcome(
                        call_id, name, raw_input, answer, None, self.settings.tool_approval_timeout_seconds))
                elif call_id in waits and answer and answer["approved"]:
                    approved.append((call_id, name, raw_input))
                elif call_id in waits:
                    reason = (answer or {}).get("reason")
                    text = ("The user denied this tool call" + (f": {reason}" if reason else ".") if answer
                            else f"Not approved within {self.settings.tool_approval_timeout_seconds:g} s: not run.")
                    self._record(turn, progress, outcomes, ToolOutcome(
                        tool_use_id=call_id, name=name, output=text, is_error=True, input=raw_input, outcome="denied"))
            await self._run_now(turn, progress, approved, outcomes)
        return [outcomes[call_id] for call_id, _name, _input in calls]

    async def _run_now(self, turn: Turn, progress: _Progress, calls: list[tuple[str, str, Any]],
                       outcomes: dict[str, ToolOutcome]) -> None:
        """Run calls (concurrently) and record their outcomes; a client tool call here is one
        whose input was invalid: its error goes back to the model without the client seeing it."""
        run = []
        for call_id, name, raw_input in calls:
            if name in progress.client_tools:
                self._record(turn, progress, outcomes, _client_outcome(
                    call_id, name, raw_input, None, progress.problems[call_id], 0))
            else:
                run.append((call_id, name, raw_input))
        if run:
            ran = await (self.tools.run_all(run) if turn.span is None
                         else tracing.run_tools(turn.span, run, self.tools.run_all))
            for o in ran:
                self._record(turn, progress, outcomes, o, counted=True)

    @staticmethod
    def _record(turn: Turn, progress: _Progress, outcomes: dict[str, ToolOutcome], o: ToolOutcome,
                counted: bool = False) -> None:
        """Keep a call's outcome and send its `tool_result` event (counted in metrics if the
        ToolSet did not run it)."""
        outcomes[o.tool_use_id] = o
        if not counted:
            metrics.tool_finished(o.name, o.outcome)
        result = {"tool_use_id": o.tool_use_id, "name": o.name, "is_error": o.is_error,
                  ("error" if o.is_error else "output"): o.output}
        if o.name in progress.client_tools:
            result["client"] = True
        turn.emit("tool_result", result)

    async def _wait_for_answers(self, turn: Turn, calls: list[tuple[str, str, Any]],
                                waits: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Announce the calls that wait (`tool_approval_request`, `client_tool_call`: each lists
        every call this pause waits for), then wait for their answers, from any worker, up to
        TOOL_APPROVAL_TIMEOUT_SECONDS. The turn keeps its lock meanwhile (renewed, heartbeats flow)
        and can be cancelled. Approvals are announced as decided (`tool_approval`)."""
        sid, tid = turn.session_id, turn.turn_id
        timeout = self.settings.tool_approval_timeout_seconds
        await self.store.wait_for_tools(sid, tid, waits, timeout + WAIT_KEY_MARGIN_SECONDS)
        turn.answered = asyncio.Event()
        pending = list(waits)
        for call_id, name, raw_input in calls:
            if call_id in waits:
                request = {"tool_use_id": call_id, "name": name, "input": raw_input, "timeout_s": timeout,
                           "pending": pending}
                if waits[call_id] == "approval":
                    turn.emit("tool_approval_request", {"tool_use_id": call_id, "approval_id": call_id, **request})
                else:
                    turn.emit("client_tool_call", request)
        deadline = time.monotonic() + timeout
        answers: dict[str, str] = {}
        try:
            while len(answers) < len(waits) and (left := deadline - time.monotonic()) > 0:
                try:
                    async with asyncio.timeout(min(left, ANSWER_POLL_SECONDS)):
                        await turn.answered.wait()
                except TimeoutError:
                    pass
                turn.answered.clear()
                try:
                    answers = await self.store.tool_answers(sid, tid, close=False)
                except Exception as exc:  # noqa: BLE001 — the store failing: read again at the next tick
                    if not store_unavailable(exc):
                        raise
            answers = await self.store.tool_answers(sid, tid, close=True)  # (later answers: not pending)
        finally:
            turn.answered = None
        decided = {call_id: json.loads(answers[call_id]) for call_id in waits if call_id in answers}
        for call_id, kind in waits.items():
            if kind == "approval":
                answer = decided.get(call_id)
                event = {"tool_use_id": call_id, "approved": bool(answer and answer["approved"])}
                if answer is None:
                    event["timed_out"] = True
                elif answer.get("reason"):
                    event["reason"] = answer["reason"]
                turn.emit("tool_approval", event)
        return decided

    async def _call_model(self, turn: Turn, req: TurnRequest, params: dict[str, Any],
                          progress: _Progress, betas: str | None = None) -> None:
        """One streamed model call; adds its content blocks to `progress.blocks` as they arrive
        (after those of a paused answer it continues). Every block is kept as the API sent it, its
        deltas applied: thinking and its signature, citations, and block types this server does not know."""
        blocks = progress.blocks
        base = len(blocks)  # (the API numbers this call's blocks from 0)
        json_parts: dict[int, list[str]] = {}
        text_parts: dict[int, list[str]] = {}  # text and thinking, joined once at the end
        call_usage = Usage()
        await self.upstream_gate.acquire()  # ApiError("overloaded") after UPSTREAM_QUEUE_TIMEOUT_SECONDS
        # (tracing) the call's span, and what its events say once: never touched per delta
        span = request_id = response = stop_reason = first_chunk_at = None
        call_started = 0.0
        try:
            if turn.span is not None:
                span = progress.call_span = tracing.start_model_call(turn.span, params)
                call_started = time.monotonic()
            async with open_stream(self.client, params, self.settings.stream_coalesce_ms / 1000, betas) as upstream:
                if request_id := upstream.request_id:
                    progress.request_ids.append(request_id)
                if not turn.events:
                    self._open(turn, req, progress)
                async for event in upstream.events():
                    if type(event) is TextDelta:
                        text = event.text
                        text_parts[base + event.index].append(text)
                        progress.text.append(text)
                        if progress.first_token_at is None:
                            self._first_token(turn, progress)
                        turn.emit_text(text, event.json)
                        continue
                    kind = event["type"]
                    if kind == "content_block_delta":
                        self._apply_delta(turn, progress, blocks[base + event["index"]], event["delta"],
                                          base + event["index"], json_parts, text_parts)
                    elif kind == "content_block_start":
                        if first_chunk_at is None:
                            first_chunk_at = time.monotonic()
                        block = dict(event["content_block"])
                        blocks.append(block)
                        self._block_started(turn, progress, block, len(blocks) - 1, text_parts)
                    elif kind == "content_block_stop":
                        index = base + event["index"]
                        block = blocks[index]
                        if index in json_parts or block["type"] in ("tool_use", "server_tool_use"):
                            self._complete_input(turn, progress, block, json_parts.pop(index, []))
                    elif kind == "message_start":
                        response = event["message"]
                        call_usage = Usage.from_api(response.get("usage"))
                    elif kind == "message_delta":
                        delta = event.get("delta") or {}
                        progress.stop_reason = stop_reason = delta.get("stop_reason")
                        progress.stop_sequence = delta.get("stop_sequence")
                        progress.stop_details = delta.get("stop_details")
                        if isinstance(container := delta.get("container"), dict) and container.get("id"):
                            progress.container = container["id"]
                        call_usage.update(event.get("usage"))
        finally:
            self.upstream_gate.release()
            for index, parts in text_parts.items():  # (also a cut stream's: keep what arrived)
                blocks[index]["thinking" if blocks[index]["type"] == "thinking" else "text"] = "".join(parts)
            progress.model_calls += 1
            progress.usage.add(call_usage)
            progress.last_prompt_tokens = call_usage.prompt_tokens or progress.last_prompt_tokens
            if span is not None:  # (a failed call's span is ended by `_run`, with the turn's error)
                tracing.model_call_result(span, call_started, request_id, response, call_usage, stop_reason,
                                          first_chunk_at, blocks[base:])
        if span is not None:
            progress.call_span = None
            tracing.end_span(span)
        # What the API would refuse when the history is sent back goes: empty text blocks (and an
        # empty assistant message), a thinking block cut before its signature, a tool call the answer
        # stopped in (max_tokens) without asking for it to be run.
        calls = progress.stop_reason == "tool_use"
        blocks[:] = [b for b in blocks if not ((b["type"] == "text" and not b["text"].strip())
                                               or (b["type"] == "thinking" and not b.get("signature"))
                                               or (b["type"] == "tool_use" and not calls))]
        if not blocks:
            blocks.append({"type": "text", "text": "(no answer)"})

    @staticmethod
    def _open(turn: Turn, req: TurnRequest, progress: _Progress) -> None:
        """The turn's first event, `turn_start` (once): its question's text, so that a client coming
        back to a running turn can show it, and the turns a rewind replaces."""
        if turn.events:
            return
        opening = {"session_id": turn.session_id, "turn_id": turn.turn_id, "model": req.model,
                   "max_tokens": req.max_tokens, "user_text": _question(progress.messages[0])}
        if progress.cut is not None:
            opening["rewound_turns"] = progress.rewound
        if turn.traceparent is not None:  # (followers on any worker link to the turn's span)
            opening["traceparent"] = turn.traceparent
        turn.emit("turn_start", opening)

    @staticmethod
    def _first_token(turn: Turn, progress: _Progress) -> None:
        """The turn's first streamed token (text or thinking): its time to first token."""
        progress.first_token_at = time.monotonic()
        metrics.first_token(progress.first_token_at - turn.started_at)

    def _block_started(self, turn: Turn, progress: _Progress, block: dict[str, Any], index: int,
                       text_parts: dict[int, list[str]]) -> None:
        kind = block["type"]
        if kind == "text":
            text_parts[index] = [block["text"]]
        elif kind == "thinking":
            text_parts[index] = [block.get("thinking") or ""]
        elif kind == "tool_use":
            turn.emit("tool_call", {"tool_use_id": block["id"], "name": block["name"]})
        elif kind == "server_tool_use":  # run by the API, within this call
            progress.server_calls[block["id"]] = block["name"]
            turn.emit("tool_call", {"tool_use_id": block["id"], "name": block["name"], "server": True})
        elif kind.endswith("_tool_result"):  # a server tool's result: complete in its start event
            content = block.get("content")
            is_error = isinstance(content, dict) and str(content.get("type", "")).endswith("_error")
            call_id = block.get("tool_use_id")
            name = progress.server_calls.get(call_id, kind)
            turn.emit("tool_result", {"tool_use_id": call_id, "name": name,
                                      "is_error": is_error, "server": True, "result_type": kind,
                                      ("error" if is_error else "output"): content})
            metrics.tool_finished(name, "error" if is_error else "ok")  # (run by the API: no duration here)
            if turn.span is not None:
                tracing.server_tool(turn.span, name, call_id, is_error, content)
        elif kind == "redacted_thinking":  # (encrypted: nothing to show but that it happened)
            turn.emit("thinking_redacted", {})
        elif kind not in _unknown_seen:
            _unknown_seen.add(kind)
            log.warning("content block of unknown type %r: kept and sent back as it is", kind)

    def _apply_delta(self, turn: Turn, progress: _Progress, block: dict[str, Any], delta: dict[str, Any],
                     index: int, json_parts: dict[int, list[str]], text_parts: dict[int, list[str]]) -> None:
        kind = delta.get("type")
        if kind == "input_json_delta":
            json_parts.setdefault(index, []).append(delta.get("partial_json", ""))
        elif kind == "thinking_delta":
            thinking = delta.get("thinking") or ""
            text_parts.setdefault(index, []).append(thinking)
            if progress.first_token_at is None:
                self._first_token(turn, progress)
            turn.emit("thinking_delta", {"thinking": thinking})
        elif kind == "signature_delta":
            block["signature"] = delta.get("signature", "")
        elif kind == "citations_delta":
            if not isinstance(block.get("citations"), list):
                block["citations"] = []
            block["citations"].append(delta.get("citation"))
            turn.emit("citation", {"citation": delta.get("citation")})
        else:  # a delta type from the future: merged the way every known delta is, field by field
            if kind not in _unknown_seen:
                _unknown_seen.add(str(kind))
                log.warning("content delta of unknown type %r: merged into its block by field", kind)
            for key, value in delta.items():
                current = block.get(key)
                if key == "type":
                    continue
                if isinstance(current, str) and isinstance(value, str):
                    block[key] = current + value
                elif isinstance(current, list):
                    current.extend(value if isinstance(value, list) else [value])
                else:
                    block[key] = value

    def _complete_input(self, turn: Turn, progress: _Progress, block: dict[str, Any], parts: list[str]) -> None:
        """A block's input, streamed as JSON text: parsed; a tool call's is validated and shown."""
        raw = "".join(parts)
        try:
            if raw.strip():
                block["input"] = json.loads(raw)
        except ValueError:
            # Keep the raw text for the tool to reject; the history must hold an object.
            block["input"] = {"_invalid_json": raw[:2000]}
        block.setdefault("input", {})
        if block["type"] == "server_tool_use":
            turn.emit("tool_input", {"tool_use_id": block["id"], "name": block["name"], "input": block["input"],
                                     "valid": True, "server": True})
        if block["type"] != "tool_use":
            return
        client = progress.client_tools.get(block["name"])
        if client is None:
            _model, problem = self.tools.validate(block["name"], block["input"])
        else:
            problem = _client_input_problem(block["name"], block["input"], client["input_schema"])
        if problem is not None:
            progress.problems[block["id"]] = problem
        payload: dict[str, Any] = {"tool_use_id": block["id"], "name": block["name"], "input": block["input"],
                                   "valid": problem is None}
        if problem is not None:
            payload["error"] = problem
        turn.emit("tool_input", payload)

    async def _finish(self, turn: Turn, req: TurnRequest, progress: _Progress, outcome: str,
                      error: ApiError | None, principal: str) -> tuple[str, ApiError | None]:
        """Commit the turn and publish its terminal event; the outcome (and error) it ended with."""
        turn.finishing = True  # a cancel arriving now must not interrupt the commit
        messages = self._messages_to_commit(progress, outcome, error)
        cost = self.prices.cost(req.model, progress.usage)
        if progress.extra_usage is not None:  # summary calls: priced by their own model
            cost += progress.extra_cost
            progress.usage.add(progress.extra_usage)
        duration = time.monotonic() - turn.started_at
        usage = progress.usage.to_dict()
        common = {"model": req.model, "usage": usage, "estimated_cost_usd": cost,
                  "model_calls": progress.model_calls, "request_ids": progress.request_ids}
        record = {"turn_id": turn.turn_id, "status": outcome, "stop_reason": progress.stop_reason, **common,
                  "messages": len(messages), "finished_at": time.time()}
        if error is not None:
            record["error"] = error.code
        if outcome in ("completed", "cancelled"):
            final_type = "turn_end"
            finish = "cancelled" if outcome == "cancelled" else FINISH.get(progress.stop_reason or "", "unknown")
            if finish == "unknown":
                log.warning("turn %s ended with stop_reason %r, unknown here", turn.turn_id, progress.stop_reason)
            payload: dict[str, Any] = {
                "session_id": turn.session_id, "turn_id": turn.turn_id,
                "stop_reason": "cancelled" if outcome == "cancelled" else progress.stop_reason, "finish": finish,
                "truncated": finish == "truncated", "cancelled": outcome == "cancelled",
                "text": "".join(progress.text), "usage": usage, "estimated_cost_usd": cost, "model": req.model,
                "model_calls": progress.model_calls,
                "request_id": progress.request_ids[-1] if progress.request_ids else None,
                "request_ids": progress.request_ids,
            }
            if progress.stop_sequence is not None:
                payload["stop_sequence"] = progress.stop_sequence
            if progress.stop_details is not None:
                payload["stop_details"] = progress.stop_details
            if progress.structured is not None:
                payload["structured"] = progress.structured
        else:
            final_type = "error"
            if error is None:  # stopped by shutdown or a lost lock
                error = ApiError("server_restarting" if outcome == "server_restarting" else "interrupted")
            payload = error.payload()
            if progress.text:  # what was streamed before the failure (not committed)
                payload["partial_text"] = "".join(progress.text)
        unsent = await self.housekeeper.release(turn)
        final = turn.terminal_event(final_type, payload)
        with tracing.commit(turn.span, self.store_system) if turn.span is not None else tracing.NOOP as span:
            committed = await self.store.finish_turn(turn.session_id, turn.turn_id, TurnCommit(
                messages=messages, record=record, usage=progress.usage, cost_usd=cost,
                last_input_tokens=progress.last_prompt_tokens, last_input_chars=progress.last_prompt_chars,
                events=[*unsent, final], owner=principal, preview=sessions.preview(messages),
                # A turn that commits nothing rewinds nothing (so a summary its rewind dropped stays);
                # a new summary covers messages before any cut: kept either way (it was paid for).
                cut=progress.cut if messages else None, kept_turns=progress.kept_turns,
                summary=(progress.summary or "") if progress.summary_changed and (messages or progress.summary)
                else None,
                summary_upto=progress.summary_upto,
                title=sessions.message_title(messages[0]) if messages and progress.cut == 0 else ""))
            if not committed and span is not None:
                tracing.commit_lost(span)
        if not committed:
            # The lock expired under us (a long stall): someone may have declared this turn
            # interrupted and started another; our answer must not be written.
            log.warning("turn %s lost its lock before commit; nothing written", turn.turn_id)
            if unsent:
                await self.store.flush([LogBatch(turn.session_id, turn.turn_id, unsent)], [])
            await self.store.abandon_turn(turn.session_id, turn.turn_id, INTERRUPTED_FIELDS)
            final = encode(turn.turn_id, ABANDONED_SEQ, "error", ApiError("interrupted").payload())
            outcome = "interrupted"
        for listener in self.turn_listeners:
            listener(principal, progress.usage)
        turn.publish_final(final)
        fields = {
            "event": "turn", "session_id": turn.session_id, "turn_id": turn.turn_id,
            "principal": principal, "outcome": outcome, "error": error.code if error else None,
            "stop_reason": progress.stop_reason, **common,
            "ttft_ms": round((progress.first_token_at - turn.started_at) * 1000, 1)
            if progress.first_token_at else None,
            "duration_ms": round(duration * 1000, 1),
        }
        if turn.span is not None:
            fields["trace_id"] = tracing.trace_id(turn.span)
        turn_log.info("turn %s", outcome, extra={"fields": fields})
        metrics.turn_finished(outcome, req.model, duration, progress.usage, cost)
        return outcome, (error if committed else ApiError("interrupted"))

    @staticmethod
    def _messages_to_commit(progress: _Progress, outcome: str, error: ApiError | None) -> list[dict[str, Any]]:
        """The turn's messages, or none. A valid history alternates user/assistant and every
        tool_use is followed by its tool_result, so a partial turn is cut to that shape."""
        done = progress.messages  # (never empty: the user's message comes first)
        if outcome == "completed" and progress.stop_reason == "refusal":
            return []  # as the API asks: the exchange that was refused is not sent again
        if outcome == "completed" or (error is not None and error.code == "max_iterations"):
            return done  # (max_iterations appended a closing assistant message)
        if outcome != "cancelled":
            return []  # failed or interrupted: history stays as it was; the client retries
        partial = [b for b in progress.blocks if b["type"] == "text" and b["text"]]
        if done[-1]["role"] == "assistant" and done[-1]["content"] is progress.blocks:
            done = done[:-1]  # the answer being streamed is handled below
        if partial:
            return [*done, {"role": "assistant", "content": partial}]
        if len(done) == 1:
            return []  # cancelled before any answer: keep the history unchanged
        if done[-1]["role"] == "user":
            return [*done, {"role": "assistant", "content": [{"type": "text", "text": "[cancelled]"}]}]
        return done


def _user_message(req: TurnRequest, started: Started) -> dict[str, Any]:
    """The turn's user message: the request's, or for a regenerate the replaced turn's own."""
    if req.content is not None:
        return req.user_message()
    stored = started.history[started.cut or 0]  # (the store checked that turn left messages)
    return stored.value if isinstance(stored, StoredMessage) else dict(stored)


def _question(message: dict[str, Any]) -> str:
    """A user message's text (its text blocks, one per line)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "\n".join(b["text"] for b in content if b.get("type") == "text" and isinstance(b.get("text"), str))


def _client_input_problem(name: str, raw_input: Any, schema: dict[str, Any]) -> str | None:
    """Why the model's input for a client tool does not match its schema (None: it does)."""
    if not isinstance(raw_input, dict) or "_invalid_json" in raw_input:
        return invalid_input(name, ["the input is not a JSON object"])
    problem = structured.check(raw_input, schema, len(json.dumps(raw_input)))
    return invalid_input(name, [problem]) if problem else None


def _client_outcome(call_id: str, name: str, raw_input: Any, answer: dict[str, Any] | None, problem: str | None,
                    timeout: float) -> ToolOutcome:
    """A client tool call's tool_result: the client's output, or why there is none."""
    if problem is not None:  # (the client never saw the call)
        return ToolOutcome(tool_use_id=call_id, name=name, output=problem, is_error=True, input=None, outcome="invalid")
    if answer is None:
        return ToolOutcome(tool_use_id=call_id, name=name, output=f"The client returned no result within {timeout:g} s.",
                           is_error=True, input=raw_input, outcome="timeout")
    return ToolOutcome(tool_use_id=call_id, name=name, output=answer["output"], is_error=answer["is_error"],
                       input=raw_input, outcome="error" if answer["is_error"] else "ok")


def _found(value: Any) -> Any:
    """The store's answer about a session; None (no such session, or another key's) is a 404."""
    if value is None:
        raise ApiError("session_not_found")
    return value


def valid_session_id(value: str) -> str:
    if not valid_id(value):
        raise ApiError("invalid_session_id")
    return value
