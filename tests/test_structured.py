"""Client JSON Schemas cannot stall the worker: patterns run on RE2 (linear time), what RE2
cannot run is refused up front, `$ref` never fetches, and checking an answer is bounded.

The catastrophic cases carry a `timeout` mark instead of timing assertions: with a
backtracking engine they take centuries, so the old code fails by timeout."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from server import structured
from server.errors import ApiError

CATASTROPHIC = "^(a+)+$"


def refused(schema: dict) -> ApiError:
    with pytest.raises(ApiError) as caught:
        structured.check_schema(schema)
    assert caught.value.code == "invalid_request" and caught.value.status == 400
    assert caught.value.extra == {"field": "response_schema"}
    return caught.value


def answer(value: object) -> str:
    return json.dumps(value)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("length", [64, 5000])
def test_catastrophic_pattern_fails_to_match_in_linear_time(length):
    schema = {"type": "string", "pattern": CATASTROPHIC}
    structured.check_schema(schema)
    value, problem = structured.parse(answer("a" * length + "!"), schema)
    assert value is None and "does not match" in problem
    assert structured.parse(answer("a" * length), schema) == ("a" * length, None)


@pytest.mark.timeout(20)
def test_pattern_properties_and_additional_properties_are_linear():
    schema = {"type": "object", "patternProperties": {CATASTROPHIC: {"type": "integer"}},
              "additionalProperties": False}
    structured.check_schema(schema)
    evil = "a" * 64 + "!"
    value, problem = structured.parse(answer({evil: 1}), schema)
    assert value is None and "does not match any of the regexes" in problem
    assert structured.parse(answer({"aaa": 1}), schema) == ({"aaa": 1}, None)
    value, problem = structured.parse(answer({"aaa": "x"}), schema)
    assert value is None and "is not of type 'integer'" in problem and "aaa" in problem


@pytest.mark.timeout(20)
def test_property_names_pattern_is_linear():
    schema = {"type": "object", "propertyNames": {"pattern": CATASTROPHIC}}
    value, problem = structured.parse(answer({"a" * 64 + "!": 1}), schema)
    assert value is None and "does not match" in problem


@pytest.mark.parametrize("pattern,where", [
    (r"(a)\1", "#/pattern"),
    ("(?=a)", "#/pattern"),
    ("(?<!a)b", "#/pattern"),
])
def test_patterns_re2_cannot_run_are_refused_with_their_location(pattern, where):
    error = refused({"type": "string", "pattern": pattern})
    assert repr(pattern) in error.message and where in error.message and "RE2" in error.message


def test_nested_and_pattern_properties_patterns_are_refused_too():
    assert "#/properties/name/pattern" in refused(
        {"properties": {"name": {"type": "string", "pattern": "(?=x)"}}}).message
    assert "#/patternProperties/" in refused({"patternProperties": {r"(a)\1": {}}}).message
    assert "#/$defs/s/pattern" in refused(  # reachable only through `$ref`, still checked
        {"$defs": {"s": {"pattern": r"(a)\1"}}, "$ref": "#/$defs/s"}).message
    assert "#/patternProperties/" in refused(  # draft-04: not covered by its meta-schema
        {"$schema": "http://json-schema.org/draft-04/schema#", "patternProperties": {"(?=a)": {}}}).message


@pytest.mark.parametrize("pattern,matches,misses", [
    ("b+", ["abbc", "b"], ["ac", ""]),                       # unanchored search
    ("^[0-9]{3}-[0-9]{4}$", ["555-1234"], ["555-12345", "x555-1234", "555-1234\n"]),
    (r"^\d+$", ["123"], ["12a", "١٢٣"]),                    # ECMA-262: \d is ASCII
    (r"^[\u00e0-\u00ff]+$", ["àé"], ["ae"]),                  # \uXXXX escapes work
    (r"^\p{L}+$", ["Ωmega"], ["a1"]),
    (r"^\\u0041$", ["\\u0041"], ["A"]),                       # an escaped backslash stays one
])
def test_valid_patterns_still_validate(pattern, matches, misses):
    schema = {"type": "string", "pattern": pattern}
    structured.check_schema(schema)
    for text in matches:
        assert structured.parse(answer(text), schema) == (text, None), text
    for text in misses:
        value, problem = structured.parse(answer(text), schema)
        assert value is None and "does not match" in problem, text


def test_format_regex_is_not_asserted():
    """`format` stays an annotation, so no answer string is ever compiled with `re`."""
    assert structured.parse(answer("(a)\\1(?=x"), {"type": "string", "format": "regex"}) == ("(a)\\1(?=x", None)


@pytest.mark.parametrize("ref", ["http://127.0.0.1:9/schema.json", "https://example.com/s#/x",
                                 "urn:example:nothing", "#/$defs/missing", "http://[bad"])
def test_refs_outside_the_schema_are_refused_and_never_fetched(ref, monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("a $ref was fetched")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    schema = {"$ref": ref}
    assert "does not point inside the schema" in refused(schema).message
    value, problem = structured.parse("1", schema)  # even unchecked: a problem, not a fetch
    assert value is None and problem


def test_refs_inside_the_schema_resolve():
    schema = {"$id": "https://example.com/root.json", "type": "array",
              "$defs": {"item": {"$id": "item.json", "type": "string"},
                        "pair": {"type": "array", "items": {"$ref": "#/$defs/item"}}},
              "items": {"anyOf": [{"$ref": "item.json"}, {"$ref": "#/$defs/pair"}]}}
    structured.check_schema(schema)
    assert structured.parse('["a", ["b"]]', schema) == (["a", ["b"]], None)
    assert structured.parse("[1]", schema)[0] is None


def test_schema_size_and_depth_are_limited():
    assert "larger than" in refused({"enum": ["x" * structured.MAX_SCHEMA_BYTES]}).message
    deep: dict = {}
    node = deep
    for _ in range(structured.MAX_SCHEMA_DEPTH):
        node["not"] = {}
        node = node["not"]
    assert "nested deeper" in refused(deep).message


@pytest.mark.parametrize("dialect", [{}, 5, ["x"]])
def test_a_non_string_dialect_is_a_400(dialect):
    refused({"$schema": dialect})


def test_unevaluated_properties_next_to_pattern_properties_is_refused():
    assert "unevaluatedProperties" in refused(
        {"patternProperties": {"^a": {}}, "unevaluatedProperties": False}).message
    structured.check_schema({"properties": {"a": {}}, "unevaluatedProperties": False})


@pytest.mark.timeout(20)
def test_ref_fan_out_is_cut_off():
    """61 `$defs` that each `allOf` the previous one twice: 2**60 checks of one string."""
    defs = {"d0": {"type": "string", "minLength": 2}}
    for i in range(1, 61):
        defs[f"d{i}"] = {"allOf": [{"$ref": f"#/$defs/d{i - 1}"}, {"$ref": f"#/$defs/d{i - 1}"}]}
    schema = {"$defs": defs, "$ref": "#/$defs/d60"}
    structured.check_schema(schema)
    value, problem = structured.parse(answer("xyz"), schema)
    assert value is None and "took longer than" in problem


@pytest.mark.timeout(20)
def test_unique_items_is_linear():
    items = [{"id": i, "tags": [i, str(i)]} for i in range(20_000)]
    schema = {"type": "array", "uniqueItems": True}
    assert structured.parse(answer(items), schema) == (items, None)
    value, problem = structured.parse(answer(items + [{"tags": [0, "0"], "id": 0.0}]), schema)
    assert value is None and "non-unique" in problem
    assert structured.parse("[1, true, {\"a\": 1}, {\"a\": true}]", schema)[1] is None


def test_a_deeply_nested_answer_is_a_problem():
    value, problem = structured.parse("[" * 100_000 + "]" * 100_000, {"type": "array"})
    assert value is None and problem


# Over real sockets: one worker, so a stalled event loop would stall /health too.

@pytest.mark.timeout(60)
async def test_catastrophic_pattern_does_not_stall_the_worker(shared_server, upstream):
    upstream.script({"text": '"' + "a" * 40 + '!"'}, {"text": '"aaaa"', "ttft_ms": 1500})
    schema = {"type": "string", "pattern": CATASTROPHIC}
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        turn = asyncio.create_task(client.post("/agent", json={"message": "a's", "response_schema": schema}))
        polls = 0
        while not turn.done():
            health = await client.get("/health", timeout=5)
            assert health.status_code == 200
            polls += 1
            await asyncio.sleep(0.1)
        r = await turn
    assert r.status_code == 200, r.text
    assert r.json()["structured"] == "aaaa"
    assert polls >= 5, "/health was polled while the turn ran"
    retry = upstream.requests()[1]["body"]["messages"][-1]["content"][0]["text"]
    assert "does not match" in retry


async def test_unsupported_pattern_is_a_400(shared_server, upstream):
    async with httpx.AsyncClient(base_url=shared_server.url, timeout=30) as client:
        r = await client.post("/agent", json={"message": "hi", "response_schema":
                                              {"type": "string", "pattern": r"(a)\1"}})
        remote = await client.post("/agent", json={"message": "hi", "response_schema":
                                                   {"$ref": "http://127.0.0.1:9/x.json"}})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == "response_schema"
    assert "RE2" in error["message"] and "#/pattern" in error["message"]
    assert remote.status_code == 400 and remote.json()["error"]["code"] == "invalid_request"
    assert upstream.requests() == []
