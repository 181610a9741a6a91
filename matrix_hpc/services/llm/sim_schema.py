"""Schema-valid sample values for the simulated LLM endpoint: JSON for
``structured_outputs.json`` / ``response_format`` and tool-call arguments
(objects, arrays, strings with enums and lengths, bounded numbers, ``$ref``,
``allOf``/``anyOf``), plus filler words for plain answers.

    sample_json({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}, random.Random(0))
"""

from __future__ import annotations

import math
import random
from typing import Any

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their can been has more if will would so no what up out about who into "
    "model answer reason step think because therefore result value data system task agent tool check"
).split()
# Free text is a slice of this fixed pseudo-random word stream: one slice per answer
# instead of one random draw per word (that was the server's largest cost).
_STREAM = random.Random(0).choices(_WORDS, k=1 << 14)
_MAX_DEPTH = 6


def filler_words(rng: random.Random, count: int) -> str:
    start = rng.randrange(len(_STREAM))
    words = _STREAM[start : start + count]
    while len(words) < count:
        words += _STREAM[: count - len(words)]
    return " ".join(words)



# -- schema-valid JSON ---------------------------------------------------------


def sample_json(schema: Any, rng: random.Random, root: Any = None, depth: int = 0) -> Any:
    """A value valid for the common JSON-schema shapes (object, array, string, integer, number,
    boolean, null, enum, const, anyOf/oneOf/allOf, local ``$ref``)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None if depth > _MAX_DEPTH else _sample_string({}, rng)
    if "$ref" in schema:
        return sample_json(_resolve_ref(schema["$ref"], root), rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return sample_json(rng.choice(options), rng, root, depth + 1)
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            part = _resolve_ref(part["$ref"], root) if "$ref" in part else part
            merged = _merge_schemas(merged, part)
        return sample_json(merged, rng, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    return _SAMPLERS[kind](schema, rng, root, depth)


def _resolve_ref(ref: str, root: Any) -> Any:
    if not ref.startswith("#/"):
        raise ValueError(f"the simulator resolves only local $ref ('#/...'), got {ref!r}")
    node = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _merge_schemas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = {**a, **b}
    if "properties" in a or "properties" in b:
        merged["properties"] = {**a.get("properties", {}), **b.get("properties", {})}
        merged["required"] = list(dict.fromkeys(a.get("required", []) + b.get("required", [])))
    return merged


def _sample_object(schema: dict[str, Any], rng: random.Random, root: Any, depth: int) -> dict[str, Any]:
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    out = {}
    for name, sub in properties.items():
        if name in required or rng.random() < 0.5:
            out[name] = sample_json(sub, rng, root, depth + 1)
    return out


def _sample_array(schema: dict[str, Any], rng: random.Random, root: Any, depth: int) -> list[Any]:
    low = int(schema.get("minItems", 1))
    high = int(schema.get("maxItems", max(low, 3)))
    items = schema.get("items", {"type": "string"})
    if schema.get("uniqueItems") and isinstance(items, dict) and "enum" in items:
        return rng.sample(list(items["enum"]), k=min(len(items["enum"]), rng.randint(low, high)))
    return [sample_json(items, rng, root, depth + 1) for _ in range(rng.randint(low, high))]


def _sample_string(schema: dict[str, Any], rng: random.Random, root: Any = None, depth: int = 0) -> str:
    low = int(schema.get("minLength", 1))
    high = int(schema.get("maxLength", max(low, 24)))
    text = " ".join(rng.choice(_WORDS) for _ in range(8))
    while len(text) < low:
        text += " " + rng.choice(_WORDS)
    return text[: rng.randint(low, high)] if high >= low else text[:low]


def _sample_integer(schema: dict[str, Any], rng: random.Random, root: Any = None, depth: int = 0) -> int:
    (low, low_open), (high, high_open) = _bounds(schema, 0, 100)
    low_i = math.ceil(low) + (1 if low_open and math.ceil(low) == low else 0)
    high_i = math.floor(high) - (1 if high_open and math.floor(high) == high else 0)
    step = schema.get("multipleOf")
    if isinstance(step, int) and step > 1:
        multiples = range(-(-low_i // step) * step, high_i + 1, step)
        if multiples:
            return rng.choice(multiples)
    return rng.randint(low_i, max(low_i, high_i))


def _sample_number(schema: dict[str, Any], rng: random.Random, root: Any = None, depth: int = 0) -> float:
    (low, low_open), (high, high_open) = _bounds(schema, 0.0, 1.0)
    value = rng.uniform(low, high)
    if (low_open and value <= low) or (high_open and value >= high):
        value = (low + high) / 2
    return value


def _bounds(schema: dict[str, Any], default_low: float,
            default_high: float) -> tuple[tuple[float, bool], tuple[float, bool]]:
    """((low, exclusive), (high, exclusive)); accepts draft-4 boolean and draft-6+ numeric exclusives."""
    low, low_open = _bound(schema, "minimum", "exclusiveMinimum")
    high, high_open = _bound(schema, "maximum", "exclusiveMaximum")
    span = default_high - default_low
    if low is None:
        low = default_low if high is None or high > default_low else high - span
    if high is None:
        high = max(default_high, low + span)
    return (low, low_open), (high, high_open)


def _bound(schema: dict[str, Any], inclusive_key: str, exclusive_key: str) -> tuple[float | None, bool]:
    exclusive = schema.get(exclusive_key)
    if isinstance(exclusive, bool):
        return schema.get(inclusive_key), exclusive
    if exclusive is not None:
        return exclusive, True
    return schema.get(inclusive_key), False


_SAMPLERS: dict[str, Any] = {
    "object": _sample_object,
    "array": _sample_array,
    "string": _sample_string,
    "integer": _sample_integer,
    "number": _sample_number,
    "boolean": lambda schema, rng, root, depth: rng.random() < 0.5,
    "null": lambda schema, rng, root, depth: None,
}
