"""MCP servers as a source of tools (`MCP_SERVERS`), through the official `mcp` SDK's client.

Imported only when MCP_SERVERS is set (`import mcp` costs about a second). Each worker keeps one
connection per configured server: a stdio server is a child process of the worker, a streamable
HTTP server a session over HTTP. A connection runs in a task of its own that connects, lists the
tools, follows `notifications/tools/list_changed`, and when the connection ends (the process
died, the HTTP session broke) connects again after a backoff (0.5 s doubling to 30 s). While a
server is down its tools stay listed, so the tool definitions (and the prompt cache that starts
with them) do not change; calling one answers a tool error the model can read.

Tools are named `<server>__<tool>` within the API's `^[a-zA-Z0-9_-]{1,64}$` (other characters
become `_`; a longer name is cut and ends with a short hash of the original, stable across
restarts). A call is one `tools/call` request: the ToolSet's timeout or the turn's cancel cancels
it, and the SDK tells the server (`notifications/cancelled`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from contextlib import AsyncExitStack
from typing import Any

import anyio
import mcp_types as types
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher

from .. import metrics
from .mcp_config import ServerConfig, parse_mcp_servers, tool_prefix
from .registry import Tool, ToolResult, invalid_input

log = logging.getLogger("server.mcp")

BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
STABLE_SECONDS = 60.0  # a connection that lasted this long starts the backoff from the beginning again
CLOSE_SECONDS = 5.0  # at shutdown: for the connections to end (a stdio server gets 2 s to exit, then a kill)
MAX_NAME = 64
MAX_PAGES = 100  # tools/list pages followed (a server whose cursor never ends cannot hang us)
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})  # what the API takes
CLIENT_INFO = types.Implementation(name="claude-agent-server", version="1")


def tool_name(server: str, tool: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """The API name of `tool` of `server`: `<server>__<tool>` with other characters as `_`; cut to 64
    characters with an 8-hex hash of the original names when too long (or when two of the server's
    tools would otherwise get the same name)."""
    name = f"{tool_prefix(server)}__{re.sub(r'[^a-zA-Z0-9_-]', '_', tool)}"
    if len(name) <= MAX_NAME and name not in taken:
        return name
    digest = hashlib.sha256(f"{server}\0{tool}".encode()).hexdigest()[:8]
    return f"{name[:MAX_NAME - 9]}_{digest}"


class McpTool(Tool):
    """One tool of an MCP server, as the model sees it."""

    def __init__(self, server: _Server, remote: types.Tool, name: str, timeout_s: float) -> None:
        self.server = server
        self.remote = remote.name
        self.name = name
        self.description = remote.description or remote.title or f"Tool {remote.name} of MCP server {server.name}."
        self.timeout_s = timeout_s
        self.input_schema: dict[str, Any] = dict(remote.input_schema)
        self._definition = {"name": name, "description": self.description, "input_schema": self.input_schema}
        self._validator: Any = None  # built at the first check

    def definition(self) -> dict[str, Any]:
        return self._definition

    def check(self, raw_input: object) -> tuple[Any, str | None]:
        """The input against the tool's JSON Schema (the server checks it too; this way the model
        hears of a mistake in the same words as for any other tool, without a round trip)."""
        if not isinstance(raw_input, dict):
            return None, invalid_input(self.name, ["input: must be an object"])
        if self._validator is None:
            self._validator = _validator(self.input_schema)
        if self._validator is False:  # (a schema jsonschema cannot use: the server decides)
            return raw_input, None
        errors = sorted(self._validator.iter_errors(raw_input), key=lambda e: list(e.absolute_path))[:5]
        if errors:
            parts = [f"{'.'.join(str(p) for p in e.absolute_path) or 'input'}: {e.message}" for e in errors]
            return None, invalid_input(self.name, parts)
        return raw_input, None

    def shown_input(self, args: Any) -> dict[str, Any]:
        return args

    async def call(self, args: Any) -> ToolResult:
        return await self.server.call(self.remote, args)


def _validator(schema: dict[str, Any]) -> Any:
    import jsonschema  # (already loaded by structured output)

    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
        return cls(schema)
    except Exception:  # noqa: BLE001 - an odd schema is the server's business, not a reason to refuse calls
        return False


def result_content(result: types.CallToolResult) -> str | list[dict[str, Any]]:
    """tool_result content: a text alone as a string, else blocks. Text and embedded text resources
    are text blocks, images (the API's types) image blocks; structured content is JSON text when
    there is nothing else; what the API cannot show is a short note saying what was left out."""
    blocks: list[dict[str, Any]] = []
    for item in result.content:
        if isinstance(item, types.TextContent):
            blocks.append({"type": "text", "text": item.text})
        elif isinstance(item, types.ImageContent) and item.mime_type in IMAGE_TYPES:
            blocks.append({"type": "image", "source": {"type": "base64", "media_type": item.mime_type,
                                                       "data": item.data}})
        elif isinstance(item, types.EmbeddedResource):
            res = item.resource
            if isinstance(res, types.TextResourceContents):
                blocks.append({"type": "text", "text": res.text})
            elif res.mime_type in IMAGE_TYPES:
                blocks.append({"type": "image", "source": {"type": "base64", "media_type": res.mime_type,
                                                           "data": res.blob}})
            else:
                blocks.append({"type": "text", "text": f"[resource {res.uri} ({res.mime_type or 'binary'}) "
                                                       "not shown]"})
        elif isinstance(item, types.ResourceLink):
            blocks.append({"type": "text", "text": f"[resource link: {item.name} {item.uri}]"})
        else:  # audio, an image of another type, a type newer than this code
            kind = getattr(item, "type", "content")
            mime = getattr(item, "mime_type", None)
            blocks.append({"type": "text", "text": f"[{kind}{f' ({mime})' if mime else ''} not shown]"})
    if not blocks and result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        return blocks[0]["text"]
    return blocks if blocks else ""


class _Dispatcher(JSONRPCDispatcher):
    """The SDK's dispatcher, telling us when its read loop ends (the server process exited, the
    transport closed): that is when the connection is gone."""

    def __init__(self, read: Any, write: Any, on_end: Any) -> None:
        super().__init__(read, write)
        self._on_end = on_end

    async def run(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().run(*args, **kwargs)
        finally:
            self._on_end()


class _Server:
    """One configured server: its connection task, state and tools."""

    def __init__(self, config: ServerConfig, timeout_s: float, connect_timeout: float, changed: Any) -> None:
        self.config = config
        self.name = config.name
        self.timeout_s = config.timeout or timeout_s
        self.connect_timeout = connect_timeout
        self.state = "starting"  # starting (first connection) | up | down
        self.error: str | None = None
        self.tools: list[McpTool] = []
        self.session: ClientSession | None = None
        self.first_attempt = asyncio.Event()  # set once the first connection is up or has failed
        self._changed = changed  # McpServers: our tool list changed
        self._wake = asyncio.Event()
        self._lost = self._stopping = self._relist = self._probe = self._failed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        metrics.mcp_server_up(self.name, False)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"mcp-server:{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=CLOSE_SECONDS)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST_SECONDS
        while not self._stopping:
            began = loop.time()
            self._lost = self._failed = False
            try:
                await self._connect_and_serve()
                error = "the connection closed"
            except Exception as exc:  # noqa: BLE001 - whatever failed, the server is down: say why and retry
                error = _describe(exc)
            if self._stopping:
                break
            if loop.time() - began >= STABLE_SECONDS:
                delay = BACKOFF_FIRST_SECONDS
            if not self._failed:
                self._down(error)
            log.warning("MCP server %s is down (%s); connecting again in %.1f s", self.name, self.error, delay)
            self._wake.clear()
            try:  # (a stop wakes us)
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    def _down(self, error: str) -> None:
        self._failed = True
        self.session, self.state, self.error = None, "down", error
        metrics.mcp_server_up(self.name, False)
        self.first_attempt.set()

    async def _connect_and_serve(self) -> None:
        async with AsyncExitStack() as stack:
            try:
                await self._serve(stack)
            except Exception as exc:  # (down as of now, not once the transport is closed: that may take seconds)
                if not self._stopping:
                    self._down(_describe(exc))
                raise

    async def _serve(self, stack: AsyncExitStack) -> None:
        config = self.config
        if config.command is not None:
            params = StdioServerParameters(command=config.command, args=list(config.args),
                                           env=config.env or None, cwd=config.cwd)
            read, write = await stack.enter_async_context(stdio_client(params))
        else:
            http = await stack.enter_async_context(create_mcp_http_client(headers=config.headers or None))
            read, write = await stack.enter_async_context(streamable_http_client(config.url, http_client=http))
        dispatcher = _Dispatcher(read, write, self._connection_lost)
        session = await stack.enter_async_context(
            ClientSession(dispatcher=dispatcher, message_handler=self._on_message, client_info=CLIENT_INFO))
        with anyio.fail_after(self.connect_timeout):
            await session.initialize()
            self._install(await _list_tools(session))
        self.session, self.state, self.error = session, "up", None
        metrics.mcp_server_up(self.name, True)
        self.first_attempt.set()
        log.info("MCP server %s is up (%d tools)", self.name, len(self.tools))
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping or self._lost:
                return
            if self._probe:  # (a call or the transport failed: is the session still good?)
                self._probe = False
                with anyio.fail_after(self.connect_timeout):
                    await session.send_ping()
            if self._relist:
                self._relist = False
                with anyio.fail_after(self.connect_timeout):
                    self._install(await _list_tools(session))

    def _connection_lost(self) -> None:
        self._lost = True
        self.session = None  # (calls from now on answer "unavailable" at once)
        self._wake.set()

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self._relist = True
            self._wake.set()
        elif isinstance(message, Exception):
            log.info("MCP server %s: transport error %s", self.name, _describe(message))
            self._check_connection()

    def _check_connection(self) -> None:
        """After a failure: ping the server from the connection task; if that fails too, the
        connection is dropped and made again (an HTTP server that restarted has forgotten our
        session; one that is gone fails the ping)."""
        if self.session is not None:
            self._probe = True
            self._wake.set()

    def _install(self, listed: list[types.Tool]) -> None:
        """Our tools from a listing: the allow list applied, named, compared with what we had."""
        allowed = self.config.allowed_tools
        if allowed is not None:
            missing = allowed - {t.name for t in listed}
            if missing:
                log.warning("MCP server %s does not offer %s (in its allowedTools)", self.name,
                            ", ".join(sorted(missing)))
        tools: list[McpTool] = []
        taken: set[str] = set()
        for remote in listed:
            if allowed is not None and remote.name not in allowed:
                continue
            if remote.input_schema.get("type") != "object":
                log.warning("MCP server %s: tool %r skipped (its input schema is not an object schema)",
                            self.name, remote.name)
                continue
            name = tool_name(self.name, remote.name, taken)
            taken.add(name)
            tools.append(McpTool(self, remote, name, self.timeout_s))
        if [t.definition() for t in tools] != [t.definition() for t in self.tools]:
            self.tools = tools
            self._changed()  # (same definitions: the objects and the version stay)

    async def call(self, remote: str, args: dict[str, Any]) -> ToolResult:
        session = self.session
        if session is None:
            return self._unavailable()
        try:
            result = await session.call_tool(remote, args)
        except MCPError as exc:
            self._check_connection()
            if exc.error.code == types.CONNECTION_CLOSED or self.session is None:
                return self._unavailable()
            return ToolResult(f"MCP server {self.name} refused the call: {exc.error.message}", is_error=True)
        except Exception as exc:  # noqa: BLE001 - a malformed answer, a transport failure: an error for the model
            self._check_connection()
            return ToolResult(f"MCP server {self.name} failed: {_describe(exc)}", is_error=True)
        return ToolResult(result_content(result), is_error=bool(result.is_error))

    def _unavailable(self) -> ToolResult:
        return ToolResult(f"MCP server {self.name} is unavailable ({self.error or 'the connection closed'}); "
                          "try again later", is_error=True)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "tools": len(self.tools)}
        if self.error and self.state != "up":
            out["error"] = self.error
        return out


async def _list_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _describe(exc: BaseException) -> str:
    """One line for a failure (an exception group: its first leaf, which is the cause)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, MCPError):
        return exc.error.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class McpServers:
    """The configured MCP servers of this worker: a ToolSource (`version`, `tools()`)."""

    def __init__(self, configs: dict[str, ServerConfig], *, tool_timeout_seconds: float,
                 connect_timeout_seconds: float) -> None:
        self.version = 0
        self._servers = [_Server(c, tool_timeout_seconds, connect_timeout_seconds, self._changed)
                         for c in configs.values() if not c.disabled]
        self._connect_timeout = connect_timeout_seconds
        self._tools: list[Tool] = []

    @classmethod
    def from_settings(cls, settings: Any) -> McpServers:
        return cls(parse_mcp_servers(settings.mcp_servers), tool_timeout_seconds=settings.tool_timeout_seconds,
                   connect_timeout_seconds=settings.mcp_connect_timeout_seconds)

    def tools(self) -> list[Tool]:
        return self._tools

    def _changed(self) -> None:
        self._tools = [tool for server in self._servers for tool in server.tools]
        self.version += 1

    async def start(self) -> None:
        """Connect to every server at once; return when each is up or has failed its first attempt
        (at most MCP_CONNECT_TIMEOUT_SECONDS and a little). A server that is not up is not fatal: it
        is retried in the background, and its tools appear once it answers."""
        for server in self._servers:
            server.start()
        waits = [asyncio.ensure_future(s.first_attempt.wait()) for s in self._servers]
        if waits:
            await asyncio.wait(waits, timeout=self._connect_timeout + 1)
            for wait in waits:
                wait.cancel()

    async def close(self) -> None:
        await asyncio.gather(*(server.stop() for server in self._servers))

    def states(self) -> dict[str, dict[str, Any]]:
        """Per server: {"state": "up" | "starting" | "down", "tools": n, "error"?} (for /ready)."""
        return {server.name: server.state_dict() for server in self._servers}
