"""One module per startup error of TOOL_MODULES (each is imported on its own)."""
