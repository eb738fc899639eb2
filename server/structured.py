"""Structured output: ask for JSON matching a client's JSON Schema, and check the answer.

The schema is checked when the request arrives (a broken schema is the client's 400, not
a failed turn). The answer is parsed and validated at the end of the turn; the engine plays
one validation failure back to the model and asks again before giving up.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError, best_match

from .errors import ApiError


def check_schema(schema: dict[str, Any]) -> None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ApiError("invalid_request", f"`response_schema` is not a valid JSON Schema: {exc.message}",
                       field="response_schema") from None


def instruction(schema: dict[str, Any]) -> str:
    return ("Respond with a single JSON value that matches this JSON Schema, and nothing else "
            "(no prose, no code fences):\n" + json.dumps(schema, separators=(",", ":")))


def parse(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """(value, None) when the answer is valid JSON matching the schema, else (None, problem)."""
    raw = text.strip()
    if raw.startswith("```"):
        raw = raw.split("\n", 1)[1] if "\n" in raw else ""
        raw = raw.rsplit("```", 1)[0].strip()
    try:
        value = json.loads(raw)
    except ValueError as exc:
        return None, f"the answer is not valid JSON ({exc.msg} at position {exc.pos})"
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = best_match(validator.iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        return None, f"{error.message} (at {where})"
    return value, None


def correction(problem: str) -> dict[str, Any]:
    """The user turn that plays a validation failure back to the model."""
    return {"role": "user", "content": [{"type": "text", "text":
            f"Your answer does not match the required JSON Schema: {problem}. "
            "Reply again with only the corrected JSON."}]}
