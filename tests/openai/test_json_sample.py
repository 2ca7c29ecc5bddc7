"""Values made up from a JSON schema validate against it: what the simulated engine answers for
structured outputs and forced tool calls."""

import random

import jsonschema
import pytest

from app.openai.json_sample import UnsupportedSchema, sample_json

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "minLength": 30}, "age": {"type": "integer",
     "minimum": 18, "maximum": 18}}, "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, "minItems": 4},
    {"type": ["null", "boolean"]},
    {"enum": ["red", "green", 3]},
    {"const": {"fixed": True}},
    {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "integer"}]},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"properties": {"b": {"type": "string"}}, "required": ["b"]}]},
    {"type": "integer", "multipleOf": 7, "minimum": 10, "maximum": 30},
    {"type": "object", "properties": {"node": {"$ref": "#/$defs/node"}}, "required": ["node"],
     "$defs": {"node": {"type": "object", "required": ["value"], "properties": {
         "value": {"type": "integer"},
         "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}}}},
    {"type": "object", "required": ["free"], "additionalProperties": {"type": "integer"}},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["x", "y", "z"]},
                                              "uniqueItems": True, "maxItems": 3}}},
    {"type": "number", "maximum": -5000},
    True,
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_every_sample_validates(schema):
    for seed in range(20):
        jsonschema.validate(sample_json(schema, random.Random(seed)), schema)


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"type": "string", "minLength": 9, "maxLength": 2},
    {"$ref": "#/$defs/missing"},
    {"$ref": "http://example.com/schema.json"},
    {"type": "polygon"},
])
def test_unsatisfiable_schemas_are_refused_not_answered_wrongly(schema):
    with pytest.raises(UnsupportedSchema):
        sample_json(schema, random.Random(0))
