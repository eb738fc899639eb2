"""A real MCP server for the tests, written with the `mcp` SDK's own server API (MCPServer).

    python tests/mcp_server.py                 # stdio
    python tests/mcp_server.py --http PORT     # streamable HTTP on 127.0.0.1:PORT/mcp

`MCP_TEST_STATE=<dir>`: the server writes `pid-<pid>` there at startup and appends what the tests
check from outside to `events.log` (a call that was cancelled, a tool added).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
from pathlib import Path

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, EmbeddedResource, ImageContent, TextContent, TextResourceContents

# A 1x1 PNG.
PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
STATE = Path(os.environ["MCP_TEST_STATE"]) if os.environ.get("MCP_TEST_STATE") else None
LONG_NAME = "a_tool_with_a_name_much_longer_than_the_messages_api_would_ever_accept_from_us"

server = MCPServer("test-server", log_level="WARNING")


def record(line: str) -> None:
    if STATE is not None:
        with open(STATE / "events.log", "a") as f:
            f.write(line + "\n")


@server.tool()
def echo(text: str) -> str:
    """Answer the text it was given."""
    return text


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


@server.tool()
def image() -> CallToolResult:
    """A one-pixel PNG image, with a caption."""
    return CallToolResult(content=[TextContent(type="text", text="a pixel"),
                                   ImageContent(type="image", data=base64.b64encode(PIXEL).decode(),
                                                mime_type="image/png")])


@server.tool()
def structured() -> CallToolResult:
    """Structured content only."""
    return CallToolResult(content=[], structured_content={"temperature": 21.5, "unit": "C"})


@server.tool()
def resource() -> CallToolResult:
    """An embedded text resource."""
    return CallToolResult(content=[EmbeddedResource(type="resource", resource=TextResourceContents(
        uri="file:///notes.txt", mime_type="text/plain", text="the notes"))])


@server.tool()
def fail() -> CallToolResult:
    """A tool that reports an error (isError)."""
    return CallToolResult(content=[TextContent(type="text", text="the disk is full")], is_error=True)


@server.tool()
async def slow(seconds: float, tag: str = "") -> str:
    """Sleep that long, then answer; a cancelled call is recorded."""
    try:
        await asyncio.sleep(seconds)
    except BaseException:
        record(f"cancelled {tag}")
        raise
    return f"slept {seconds}"


@server.tool()
async def add_tool(name: str, ctx: Context) -> str:
    """Add a tool named `name` (it echoes) and tell the client its tool list changed."""

    def added(text: str) -> str:
        return f"{name}: {text}"

    server.add_tool(added, name=name, description=f"The added tool {name}.")
    record(f"added {name}")
    await ctx.session.send_tool_list_changed()
    return f"added {name}"


@server.tool()
def crash() -> str:
    """Make the server process exit at once (no answer)."""
    os._exit(3)


def dotted() -> str:
    return "dotted"


def long_named() -> str:
    return "long"


server.add_tool(dotted, name="dotted.name", description="A tool whose name has a dot.")
server.add_tool(long_named, name=LONG_NAME, description="A tool whose name is long.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, help="serve streamable HTTP on this port")
    args = parser.parse_args()
    if STATE is not None:
        (STATE / f"pid-{os.getpid()}").touch()
    if args.http:
        print(f"listening on http://127.0.0.1:{args.http}/mcp", file=sys.stderr, flush=True)
        asyncio.run(server.run_streamable_http_async(host="127.0.0.1", port=args.http))
    else:
        asyncio.run(server.run_stdio_async())


if __name__ == "__main__":
    main()
