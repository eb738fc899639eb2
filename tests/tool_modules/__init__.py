"""Tool modules the tests load with TOOL_MODULES (tests.tool_modules.weather, ...); `bad/` holds
one module per startup error."""
