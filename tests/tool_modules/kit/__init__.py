"""A package of tool modules: TOOL_MODULES=tests.tool_modules.kit loads the tools of the submodules
it imports."""

from . import dice  # noqa: F401
