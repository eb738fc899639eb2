"""Structured output: ask for JSON matching a client's JSON Schema, and check the answer.

The schema is checked on arrival (a broken schema is the client's 400, not a failed turn), the
answer at the end of the turn (one failure is played back to the model before giving up).
Validation runs in the event loop on the client's schema, so no schema may make it backtrack,
fetch, or run long:
- patterns (`pattern`, `patternProperties`, also as `additionalProperties` sees them, and
  `propertyNames`) run on RE2, linear in the input, never on `re`. JSON Schema patterns are
  ECMA-262, which RE2 mostly reads (`\\uXXXX` is translated); what it cannot run (backreferences,
  lookaround, ...) is a 400 naming its location, as is `unevaluatedProperties` next to
  `patternProperties` (jsonschema would use `re` there);
- `$ref` resolves only inside the schema: nothing is ever fetched (no SSRF, no blocking I/O);
- the schema's size and depth are bounded, `uniqueItems` is linear, and checking one answer stops
  at a deadline that grows with its length, which bounds `$ref`/`allOf` fan-out."""

from __future__ import annotations

import json
import math
import re
import time
from contextvars import ContextVar
from functools import lru_cache, partial
from typing import Any, Callable, Iterator

import jsonschema
import re2
import referencing.exceptions
import referencing.jsonschema
from jsonschema.exceptions import ValidationError, best_match

from .errors import ApiError

MAX_SCHEMA_BYTES = 64 * 1024   # compact UTF-8 JSON; the schema is also sent in the system prompt
MAX_SCHEMA_DEPTH = 64          # nested objects and arrays
# Time one answer's check may take, well above what legitimate checks need.
CHECK_SECONDS = 0.05
CHECK_SECONDS_PER_CHAR = 5e-6

_NO_FETCH: referencing.Registry[Any] = referencing.Registry()  # retrieving anything fails
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False   # a refused pattern is the client's 400, not a line on stderr
_RE2_OPTIONS.max_mem = 1 << 20    # per compiled pattern: bounds the cache below to ~128 MiB
_RE2_OPTIONS.never_capture = True
_ESCAPE = re.compile(r"\\(u([0-9A-Fa-f]{4})|.)", re.DOTALL)  # one escape at a time: linear


@lru_cache(maxsize=128)
def _compile(pattern: str) -> Any:
    """The RE2 program for a JSON Schema pattern (raises re2.error; JSON Schema patterns are
    unanchored: use `search`); cached by pattern."""
    return re2.compile(_ESCAPE.sub(lambda m: f"\\x{{{m[2]}}}" if m[2] else m[0], pattern), _RE2_OPTIONS)


# jsonschema's keywords that use `re` (or are quadratic), redone on RE2 with the same messages.

def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _compile(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any,
                        schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "object"):
        for pattern, subschema in patterns.items():
            for key, value in instance.items():
                if _compile(pattern).search(key):
                    yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, extra: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    known, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
    extras = sorted(k for k in instance if k not in known and not any(_compile(p).search(k) for p in patterns))
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif not extra and extras:
        names = ", ".join(repr(k) for k in extras)
        if patterns:
            regexes = ", ".join(repr(p) for p in sorted(patterns))
            yield ValidationError(f"{names} {'does' if len(extras) == 1 else 'do'} not match any of "
                                  f"the regexes: {regexes}")
        else:
            yield ValidationError(f"Additional properties are not allowed ({names} "
                                  f"{'was' if len(extras) == 1 else 'were'} unexpected)")


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """Hashing, not jsonschema's pairwise (quadratic) compare."""
    if unique and validator.is_type(instance, "array") and len({_key(v) for v in instance}) < len(instance):
        yield ValidationError(f"{instance!r} has non-unique elements")


def _key(value: Any) -> Any:
    """Hashable, and equal exactly when JSON Schema says equal: 1 == 1.0, true != 1, keys unordered."""
    if isinstance(value, dict):
        return "object", frozenset((k, _key(v)) for k, v in value.items())
    if isinstance(value, list):
        return "array", tuple(_key(v) for v in value)
    return ("boolean" if isinstance(value, bool) else "scalar"), value


_KEYWORDS = {"pattern": _pattern, "patternProperties": _pattern_properties,
             "additionalProperties": _additional_properties, "uniqueItems": _unique_items}
_deadline: ContextVar[float] = ContextVar("structured_deadline", default=math.inf)


@lru_cache(maxsize=None)
def _validator_class(base: Any) -> Any:
    """The dialect's validator with RE2 keywords (one class per dialect), every keyword refusing
    (TimeoutError) to start past the deadline parse() set (none outside parse)."""
    def timed(keyword: Callable[..., Any]) -> Callable[..., Any]:
        def run(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
            if time.monotonic() > _deadline.get():
                raise TimeoutError
            return keyword(validator, value, instance, schema)
        return run
    keywords = {**base.VALIDATORS, **{k: f for k, f in _KEYWORDS.items() if k in base.VALIDATORS}}
    return jsonschema.validators.extend(base, {k: timed(f) for k, f in keywords.items()})


# The schema's `$schema` dialect; the latest one when absent or unknown (a default: no warning).
_dialect = partial(jsonschema.validators.validator_for, default=jsonschema.Draft202012Validator)


def _invalid(message: str, name: str) -> ApiError:
    return ApiError("invalid_request", message, field=name.split("[")[0])


def check_schema(schema: dict[str, Any], name: str = "response_schema") -> None:
    """Refuse (400) a schema that is invalid, too big or deep, holds a lone surrogate, refers
    outside itself, or uses a pattern RE2 cannot run, so that validating answers against it
    later is bounded (and it can be kept and sent on)."""
    _check_tree(schema, name)  # first: json.dumps recurses, and cannot encode a lone surrogate
    if len(json.dumps(schema, ensure_ascii=False, separators=(",", ":")).encode()) > MAX_SCHEMA_BYTES:
        raise _invalid(f"`{name}` is larger than {MAX_SCHEMA_BYTES} bytes of JSON.", name)
    if not isinstance(schema.get("$schema", ""), str):
        raise _invalid(f"`{name}` `$schema` must be a string.", name)
    cls = _dialect(schema)
    # jsonschema's check_schema on our keywords: its stock `uniqueItems` is quadratic, and
    # `format: regex` would compile with `re` (RE2's job, below).
    meta = _validator_class(_dialect(cls.META_SCHEMA))(cls.META_SCHEMA, registry=_NO_FETCH)
    error = next(meta.iter_errors(schema), None)
    if error is not None:
        raise _invalid(f"`{name}` is not a valid JSON Schema: {error.message}", name)
    seen: set[str] = set()
    for sub in _reachable(cls, schema, name):
        seen.update(sub)
        regexes = [("/pattern", sub["pattern"])] if isinstance(sub.get("pattern"), str) else []
        if isinstance(sub.get("patternProperties"), dict):
            regexes += [("/patternProperties/" + _escape(p), p) for p in sub["patternProperties"]]
        for at, pattern in regexes:
            try:
                _compile(pattern)
            except re2.error as exc:
                reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
                raise _invalid(f"`{name}` pattern {pattern!r} at {_where(schema, sub)}{at} is not "
                               f"supported ({reason}); patterns are matched by RE2: no backreferences or "
                               "lookaround.", name) from None
    if {"unevaluatedProperties", "patternProperties"} <= seen and "unevaluatedProperties" in cls.VALIDATORS:
        raise _invalid(f"`{name}` cannot use `unevaluatedProperties` together with "
                       "`patternProperties` (those patterns would not run on RE2).", name)


def _check_tree(schema: dict[str, Any], name: str) -> None:
    """Refuses a lone surrogate in any key or string and nesting deeper than MAX_SCHEMA_DEPTH
    (iteratively: jsonschema and json.dumps recurse)."""
    from .requests import check_text  # (requests imports this module)
    todo: list[tuple[Any, int]] = [(schema, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, str):
            check_text(node, f"A string in `{name}`", name.split("[")[0])
            continue
        if depth > MAX_SCHEMA_DEPTH:
            raise _invalid(f"`{name}` is nested deeper than {MAX_SCHEMA_DEPTH} levels.", name)
        for key, child in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(key, str):
                check_text(key, f"A key in `{name}`", name.split("[")[0])
            if isinstance(child, (str, dict, list)):
                todo.append((child, depth + 1))


def _where(schema: dict[str, Any], node: Any) -> str:
    """`node`'s JSON Pointer in `schema`, for a message (searched for: only a refusal needs it)."""
    todo: list[tuple[Any, str]] = [(schema, "")]
    while todo:
        item, path = todo.pop()
        if item is node:
            return "#" + path
        for key, child in (item.items() if isinstance(item, dict) else enumerate(item)):
            if isinstance(child, (dict, list)):
                todo.append((child, f"{path}/{_escape(str(key))}"))
    return "#?"


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _reachable(cls: Any, schema: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """Every subschema validation can reach through keywords and `$ref`s, each once; a
    reference that does not resolve inside the schema is a 400."""
    spec = referencing.jsonschema.specification_with(cls.ID_OF(cls.META_SCHEMA))
    root = spec.create_resource(schema)
    todo = [(_NO_FETCH.resolver_with_root(root), root)]
    done: set[int] = set()
    while todo:
        resolver, resource = todo.pop()
        sub = resource.contents
        if not isinstance(sub, dict) or id(sub) in done:
            continue
        done.add(id(sub))
        yield sub
        todo += [(resolver.in_subresource(s), s) for s in resource.subresources()]
        for keyword in ("$ref", "$dynamicRef", "$recursiveRef"):
            if isinstance(sub.get(keyword), str):
                try:
                    resolved = resolver.lookup(sub[keyword])
                except (referencing.exceptions.Unresolvable, ValueError):
                    raise _invalid(f"`{name}` `{keyword}` {sub[keyword]!r} at {_where(schema, sub)} "
                                   "does not point inside the schema (nothing is fetched).", name) from None
                todo.append((resolved.resolver, spec.create_resource(resolved.contents)))


def instruction(schema: dict[str, Any]) -> str:
    return ("Respond with a single JSON value that matches this JSON Schema, and nothing else "
            "(no prose, no code fences):\n" + json.dumps(schema, separators=(",", ":")))


def parse(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """(value, None) when the answer is valid JSON matching the schema, else (None, problem).
    `schema` must have passed check_schema."""
    raw = text.strip()
    if raw.startswith("```"):
        raw = raw.partition("\n")[2].rsplit("```", 1)[0].strip()
    try:
        value = json.loads(raw)
    except ValueError as exc:
        return None, f"the answer is not valid JSON ({exc.msg} at position {exc.pos})"
    except RecursionError:
        return None, "the answer is nested too deeply"
    problem = check(value, schema, len(raw))
    return (None, problem) if problem else (value, None)


def check(value: Any, schema: dict[str, Any], size: int) -> str | None:
    """The first problem of `value` against `schema` (which passed check_schema), or None;
    `size` (of its JSON, in characters) sets how long the check may take."""
    validator = _validator_class(_dialect(schema))(schema, registry=_NO_FETCH)
    budget = CHECK_SECONDS + CHECK_SECONDS_PER_CHAR * size
    token = _deadline.set(time.monotonic() + budget)
    try:
        error = best_match(validator.iter_errors(value))
    except TimeoutError:
        return f"checking the answer against the schema took longer than {budget:.2f} s"
    except (referencing.exceptions.Unresolvable, re2.error, RecursionError, ValueError) as exc:
        return f"the answer could not be checked against the schema ({exc})"
    finally:
        _deadline.reset(token)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        return f"{error.message} (at {where})"
    return None


def correction(problem: str) -> dict[str, Any]:
    """The user turn that plays a validation failure back to the model."""
    return {"role": "user", "content": [{"type": "text", "text":
            f"Your answer does not match the required JSON Schema: {problem}. "
            "Reply again with only the corrected JSON."}]}
