"""Thin adapters from a wire protocol to the turn engine: JSON, SSE, WebSocket."""
