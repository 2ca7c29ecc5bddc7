"""A JSON value that validates against a JSON schema, made up at random: what an engine without a
grammar backend answers for structured outputs and forced tool calls (the simulated engine).

It covers the schema keywords structured-output and tool definitions use in practice: types (and
lists of types), `properties` / `required` / `additionalProperties`, `items` and item counts, `enum`
and `const`, string lengths and a few formats, number bounds and `multipleOf`, `anyOf` / `oneOf` /
`allOf`, and `$ref` into `$defs` / `definitions`. A `pattern` is not honoured (a regular expression
would need a generator of its own); such a string may not match.
"""

from __future__ import annotations

import math
import random
from typing import Any

_WORDS = ("alpha", "bravo", "delta", "echo", "lima", "oscar", "sierra", "tango", "zulu", "nova", "orbit")
_FORMATS = {
    "date": "2026-01-31", "date-time": "2026-01-31T12:00:00Z", "time": "12:00:00", "email": "user@example.com",
    "uri": "https://example.com/a", "uuid": "123e4567-e89b-12d3-a456-426614174000", "ipv4": "192.0.2.1",
}
_MAX_DEPTH = 6


class UnsupportedSchema(ValueError):
    """The schema asks for something no value satisfies here (an unknown `$ref`, contradictory bounds)."""


def sample_json(schema: Any, rng: random.Random) -> Any:
    """A value valid against `schema` (a JSON schema as a dict, or a boolean schema)."""
    return _Sampler(schema if isinstance(schema, dict) else {}, rng).value(schema, 0)


class _Sampler:
    def __init__(self, root: dict[str, Any], rng: random.Random) -> None:
        self._root = root
        self._rng = rng

    def value(self, schema: Any, depth: int) -> Any:
        if schema is True or schema is None or schema == {}:
            return self._word()
        if schema is False:
            raise UnsupportedSchema("a `false` schema admits no value")
        if not isinstance(schema, dict):
            raise UnsupportedSchema(f"a schema must be an object or a boolean, not {type(schema).__name__}")
        if "$ref" in schema:
            return self.value(self._resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return self._rng.choice(schema["enum"])
        for keyword in ("anyOf", "oneOf"):
            if schema.get(keyword):
                # The first branch: oneOf's branches may overlap, and the first is the most likely intent.
                return self.value(schema[keyword][0], depth + 1)
        if schema.get("allOf"):
            merged = {key: value for key, value in schema.items() if key != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
                merged = _merge(merged, part if isinstance(part, dict) else {})
            return self.value(merged, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return self._string(schema)
        if kind in ("integer", "number"):
            return self._number(schema, integer=kind == "integer")
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "null":
            return None
        raise UnsupportedSchema(f"unknown type {kind!r}")

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise UnsupportedSchema(f"only local references are supported, not {ref!r}")
        node: Any = self._root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise UnsupportedSchema(f"the reference {ref!r} points nowhere")
            node = node[part]
        return node

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        out: dict[str, Any] = {}
        for name, sub in properties.items():
            # Optional properties too, while shallow, so answers look like what a model writes.
            if name in required or depth < 2:
                out[name] = self.value(sub, depth + 1)
        for name in required - out.keys():
            extra = schema.get("additionalProperties")
            out[name] = self.value(extra if isinstance(extra, dict) else True, depth + 1)
        return out

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", max(low, 3)))
        if low > high:
            raise UnsupportedSchema(f"minItems {low} exceeds maxItems {high}")
        count = low if depth >= _MAX_DEPTH else self._rng.randint(max(low, min(1, high)), high)
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", True)
        out = [self.value(prefix[i] if i < len(prefix) else items, depth + 1) for i in range(count)]
        if schema.get("uniqueItems") and len({repr(v) for v in out}) < len(out):
            out = list({repr(v): v for v in out}.values())
            if len(out) < low:
                raise UnsupportedSchema("cannot make enough unique items")
        return out

    def _string(self, schema: dict[str, Any]) -> str:
        if schema.get("format") in _FORMATS:
            return _FORMATS[schema["format"]]
        low = int(schema.get("minLength", 0))
        high = int(schema.get("maxLength", max(low, 24)))
        if low > high:
            raise UnsupportedSchema(f"minLength {low} exceeds maxLength {high}")
        text = self._word()
        while len(text) < low:
            text += " " + self._word()
        return text[:high]

    def _number(self, schema: dict[str, Any], *, integer: bool) -> int | float:
        low = schema.get("minimum", -1000)
        high = schema.get("maximum", 1000)
        if "exclusiveMinimum" in schema:
            low = max(low, schema["exclusiveMinimum"] + (1 if integer else 1e-6))
        if "exclusiveMaximum" in schema:
            high = min(high, schema["exclusiveMaximum"] - (1 if integer else 1e-6))
        if "minimum" not in schema and "exclusiveMinimum" not in schema and high < low:
            low = high - 1000
        if "maximum" not in schema and "exclusiveMaximum" not in schema and high < low:
            high = low + 1000
        if integer:
            low, high = math.ceil(low), math.floor(high)
        if low > high:
            raise UnsupportedSchema(f"no number lies between {low} and {high}")
        step = schema.get("multipleOf")
        if step:
            first, last = math.ceil(low / step), math.floor(high / step)
            if first > last:
                raise UnsupportedSchema(f"no multiple of {step} lies between {low} and {high}")
            value = self._rng.randint(first, last) * step
            return int(value) if integer else value
        if integer:
            return self._rng.randint(int(low), int(high))
        value = self._rng.uniform(low, high)
        short = round(value, 3)  # reads like a model's number, unless rounding leaves the bounds
        return short if low <= short <= high else value

    def _word(self) -> str:
        return self._rng.choice(_WORDS)


def _merge(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **{k: v for k, v in part.items() if k not in ("properties", "required")}}
    merged["properties"] = {**(base.get("properties") or {}), **(part.get("properties") or {})}
    merged["required"] = [*(base.get("required") or []), *(part.get("required") or [])]
    if not merged["properties"]:
        merged.pop("properties")
    if not merged["required"]:
        merged.pop("required")
    return merged
