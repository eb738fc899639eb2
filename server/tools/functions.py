"""`@tool`: a plain function becomes a Tool. Its typed signature (or a single pydantic model
parameter) becomes a pydantic model, which gives both the JSON schema the model reads and the
validation of the arguments it sends back, so the function only ever sees clean input. The
docstring is the description. Decorated functions are registered by module when the module is
imported; `server.tools.modules` picks them up for TOOL_MODULES."""

from __future__ import annotations

import asyncio
import copy
import inspect
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.json_schema import GenerateJsonSchema

from .registry import TOOL_NAME, Tool, ToolResult, invalid_input, json_text

DEFAULT_TIMEOUT_S = 10.0  # (a ToolSet from load_toolset uses TOOL_TIMEOUT_SECONDS instead)

F = TypeVar("F", bound=Callable[..., Any])


class ToolDefinitionError(ValueError):
    """A function `@tool` cannot turn into a tool; says which and why."""

    def __init__(self, module: str, name: str, problem: str) -> None:
        super().__init__(f"module {module!r}, tool {name!r}: {problem}")
        self.module, self.name, self.problem = module, name, problem


class _Untitled(GenerateJsonSchema):
    """pydantic's JSON Schema without the titles it makes up (noise for the model): not the
    model's, not each field's (a property named "title" stays, being a name)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def model_schema(self, schema: Any) -> Any:
        return {k: v for k, v in super().model_schema(schema).items() if k != "title"}


def input_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema as the API's `input_schema`: type, properties, required first."""
    schema = model.model_json_schema(schema_generator=_Untitled)
    ordered = {key: schema.pop(key) for key in ("type", "properties", "required") if key in schema}
    return {**ordered, **schema}  # then e.g. additionalProperties, $defs


def validation_problems(exc: ValidationError) -> list[str]:
    """One part per field error, phrased so the model can fix its call."""
    parts = []
    for err in exc.errors(include_url=False):
        msg = err["msg"]
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # drop pydantic's "Value error, " prefix
        parts.append(f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {msg}")
    return parts


def description_of(doc: str) -> str:
    """A docstring as a description: dedented, and the lines of a plain paragraph joined (hard
    wrapping is noise for the model); paragraphs with indented, list or table lines stay as written."""
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.splitlines()
        structured = any(re.match(r"\s|[-*+|>]\s|\d+[.)]\s|[A-Z][a-z]+:$", line) for line in lines[1:])
        paragraphs.append(paragraph if structured else " ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


class FunctionTool(Tool):
    """A Python function as a tool: `func(model)` (its single pydantic model parameter) or
    `func(**fields)` (its typed parameters, validated through a model built from them)."""

    def __init__(self, name: str, description: str, input_model: type[BaseModel], func: Callable[..., Any],
                 timeout_s: float = DEFAULT_TIMEOUT_S, *, params: tuple[tuple[str, str], ...] | None = None,
                 own_timeout: bool = True) -> None:
        self.name, self.description, self.input_model, self.func = name, description, input_model, func
        self.timeout_s = timeout_s
        self.own_timeout = own_timeout  # False: the deployment's TOOL_TIMEOUT_SECONDS applies
        self.params = params  # (parameter, model field) pairs; None: func takes the model
        self.is_async = inspect.iscoroutinefunction(func)
        self._definition = {"name": name, "description": description, "input_schema": input_schema(input_model)}

    def with_timeout(self, timeout_s: float) -> FunctionTool:
        """This tool with another time limit (the schema is not derived again)."""
        bound = copy.copy(self)
        bound.timeout_s, bound.own_timeout = timeout_s, True
        return bound

    def definition(self) -> dict[str, Any]:
        return self._definition

    def check(self, raw_input: object) -> tuple[BaseModel | None, str | None]:
        try:
            return self.input_model.model_validate(raw_input), None
        except ValidationError as exc:
            return None, invalid_input(self.name, validation_problems(exc))

    def shown_input(self, args: BaseModel) -> dict[str, Any]:
        return args.model_dump(mode="json", by_alias=True)

    async def call(self, args: BaseModel) -> Any:
        """Sync functions run in a thread (not blocking the event loop), abandoned on timeout
        (threads cannot be killed): they should be bounded on their own as well."""
        if self.params is None:
            call_args: tuple[Any, ...] = (args,)
            kwargs: dict[str, Any] = {}
        else:
            call_args, kwargs = (), {param: getattr(args, field) for param, field in self.params}
        if self.is_async:
            result = await self.func(*call_args, **kwargs)
        else:
            result = await asyncio.to_thread(self.func, *call_args, **kwargs)
        # (a list from a function is data, not content blocks: those come in a ToolResult)
        return result if isinstance(result, (str, ToolResult)) else json_text(result)


_REGISTRY: dict[str, dict[str, FunctionTool]] = {}  # module -> tool name -> tool, in definition order


def registered(module: str) -> dict[str, FunctionTool]:
    """The tools `@tool` registered for a module (and its submodules, for a package), in order."""
    found = dict(_REGISTRY.get(module, {}))
    prefix = module + "."
    for other, tools in _REGISTRY.items():
        if other.startswith(prefix):
            found.update((name, t) for name, t in tools.items() if name not in found)
    return found


def forget(module: str) -> None:
    """Drop a module's registrations (its import failed: a retry registers them again)."""
    _REGISTRY.pop(module, None)


def _build(func: Callable[..., Any], name: str | None, description: str | None,
           timeout: float | None) -> FunctionTool:
    module = getattr(func, "__module__", None) or "?"
    tool_name = name if name is not None else getattr(func, "__name__", "?")

    def fail(problem: str) -> ToolDefinitionError:
        return ToolDefinitionError(module, tool_name, problem.splitlines()[0])  # (pydantic's advice follows)

    if not inspect.isfunction(func):
        raise fail(f"@tool applies to a plain def or async def function, not {type(func).__name__}")
    if not isinstance(tool_name, str) or not TOOL_NAME.fullmatch(tool_name):
        raise fail("the name must be 1 to 64 characters among a-z A-Z 0-9 _ - (the API's rule); "
                   "set another with @tool(name=...)")
    doc = description if description is not None else func.__doc__
    if not doc or not doc.strip():
        raise fail("no description: write a docstring (what the tool does and when to use it) "
                   "or pass @tool(description=...)")
    if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout <= 3600):
        raise fail(f"timeout must be a number of seconds in (0, 3600], not {timeout!r}")
    try:
        signature = inspect.signature(func, eval_str=True)
    except Exception as exc:  # (a string annotation naming what the module does not define)
        raise fail(f"cannot resolve the type annotations: {type(exc).__name__}: {exc}") from None
    parameters = list(signature.parameters.values())
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise fail(f"parameter {p.name!r}: *args, **kwargs and positional-only parameters cannot "
                       "come from the model's JSON input")
        if p.annotation is p.empty:
            raise fail(f"parameter {p.name!r} has no type annotation (it gives the input schema)")
    params: tuple[tuple[str, str], ...] | None
    if (len(parameters) == 1 and parameters[0].default is parameters[0].empty
            and isinstance(parameters[0].annotation, type) and issubclass(parameters[0].annotation, BaseModel)):
        input_model, params = parameters[0].annotation, None
    else:
        # Fields under safe names, aliased to the parameters' (a parameter may be called `json`,
        # `schema` or `_x`, which a pydantic field may not).
        fields = {f"p{i}": (Annotated[p.annotation, Field(alias=p.name)], ... if p.default is p.empty else p.default)
                  for i, p in enumerate(parameters)}
        params = tuple((p.name, f"p{i}") for i, p in enumerate(parameters))
        try:
            input_model = create_model(f"{tool_name}_input", __config__=ConfigDict(extra="forbid"),
                                       **fields)  # type: ignore[call-overload]
        except Exception as exc:
            raise fail(f"cannot build an input model from the signature: {type(exc).__name__}: {exc}") from None
    try:
        return FunctionTool(tool_name, description_of(doc), input_model, func,
                            timeout if timeout is not None else DEFAULT_TIMEOUT_S,
                            params=params, own_timeout=timeout is not None)
    except Exception as exc:  # (a type pydantic cannot describe in JSON Schema, a bad default)
        raise fail(f"cannot derive the input schema: {type(exc).__name__}: {exc}") from None


def _register(built: FunctionTool) -> None:
    module = built.func.__module__
    tools = _REGISTRY.setdefault(module, {})
    previous = tools.get(built.name)
    if previous is not None and previous.func.__qualname__ != built.func.__qualname__:  # (not a re-import)
        raise ToolDefinitionError(module, built.name, f"defined twice in the module ({previous.func.__qualname__} "
                                                      f"and {built.func.__qualname__})")
    tools[built.name] = built


@overload
def tool(func: F, /) -> F: ...
@overload
def tool(*, name: str | None = None, description: str | None = None,
         timeout: float | None = None) -> Callable[[F], F]: ...


def tool(func: Callable[..., Any] | None = None, /, *, name: str | None = None, description: str | None = None,
         timeout: float | None = None) -> Any:
    """Make a function a tool: `@tool` or `@tool(name=..., description=..., timeout=seconds)`.
    Its typed parameters are the input (`Annotated[int, Field(description=...)]` describes one),
    or a single parameter annotated with a pydantic model is; its docstring describes it; it
    returns text, anything JSON-able, or a ToolResult (content blocks, errors). The function
    itself is returned unchanged (still callable), with the Tool as its `tool` attribute.
    Raises ToolDefinitionError (a ValueError) for what cannot be a tool."""

    def decorate(f: F) -> F:
        built = _build(f, name, description, timeout)
        _register(built)
        f.tool = built  # type: ignore[attr-defined]
        return f

    return decorate if func is None else decorate(func)
