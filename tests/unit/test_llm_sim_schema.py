"""The simulator's JSON-schema sampler returns values that validate."""

from __future__ import annotations

import random
from typing import Any

import jsonschema
import pytest

from matrix_hpc.services.llm.sim_schema import sample_json

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 3, "maxLength": 10},
            "age": {"type": "integer", "minimum": 18, "maximum": 20},
            "score": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "ok": {"type": "boolean"},
            "kind": {"enum": ["a", "b", "c"]},
            "nothing": {"type": "null"},
        },
        "required": ["name", "age", "score", "ok", "kind"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": {"type": "object", "properties": {
                "n": {"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 30},
                "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 2, "maxItems": 2}},
                "required": ["n", "tags"]}, "minItems": 1, "maxItems": 4},
            "maybe": {"type": ["string", "null"]},
        },
        "required": ["steps", "maybe"],
    },
    "pydantic_refs": {
        "$defs": {"Car": {"type": "object", "properties": {"brand": {"type": "string"},
                                                          "kind": {"$ref": "#/$defs/Kind"}},
                          "required": ["brand", "kind"]},
                  "Kind": {"type": "string", "enum": ["sedan", "suv"]}},
        "type": "object",
        "properties": {"car": {"$ref": "#/$defs/Car"}, "year": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
        "required": ["car", "year"],
    },
    "combinators": {
        "allOf": [{"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]},
                  {"properties": {"b": {"type": "string", "maxLength": 2}}, "required": ["b"]}],
    },
    "draft4_exclusive": {"type": "integer", "minimum": 1, "maximum": 3, "exclusiveMinimum": True, "exclusiveMaximum": True},
    "only_max": {"type": "integer", "maximum": -5},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_samples_validate(name: str) -> None:
    schema = SCHEMAS[name]
    validator = jsonschema.Draft4Validator if name == "draft4_exclusive" else jsonschema.Draft202012Validator
    rng = random.Random(1)
    for _ in range(200):
        validator(schema).validate(sample_json(schema, rng))


def test_same_seed_same_value() -> None:
    schema = SCHEMAS["nested"]
    assert sample_json(schema, random.Random(7)) == sample_json(schema, random.Random(7))
