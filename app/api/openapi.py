"""The gateway's OpenAPI document (`GET /openapi.json`): every route, with the request bodies' JSON Schemas
taken from the pydantic models that read them, so clients and fuzzers see what the gateway accepts."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    ResponseObject,
    ResponsesRequest,
    TokenizeRequest,
    TokenizeResponse,
)

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
    }}},
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"description": "An OpenAI error body.", **_json({"$ref": "#/components/schemas/Error"})}
            for status in statuses}


def _generate(summary: str, request: type[BaseModel], response: type[BaseModel]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, **_json(_ref(request))},
        "responses": {
            "200": {"description": "The answer, or server-sent events when `stream` is true.", **_json(_ref(response)),
                    },
            **_errors(400, 404, 413, 429, 503),
        },
    }}


def _post(summary: str, request: type[BaseModel], response: type[BaseModel]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, **_json(_ref(request))},
        "responses": {"200": {"description": "The answer.", **_json(_ref(response))}, **_errors(400, 404, 413)},
    }}


@cache
def openapi_document() -> bytes:
    requests: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest,
                                       TokenizeRequest, DetokenizeRequest]
    responses: list[type[BaseModel]] = [ChatCompletionResponse, CompletionResponse, EmbeddingResponse, ResponseObject,
                                        ModelList, ModelCard, TokenizeResponse, DetokenizeResponse]
    _, definitions = models_json_schema([(m, "validation") for m in requests] +
                                        [(m, "serialization") for m in responses],
                                        ref_template="#/components/schemas/{model}")
    schemas = {**definitions.get("$defs", {}), "Error": _ERROR}
    document = {
        "openapi": "3.1.0",
        "info": {"title": "LLM gateway", "version": "1", "description": "OpenAI-compatible API."},
        "paths": {
            "/v1/chat/completions": _generate("A chat completion", ChatCompletionRequest, ChatCompletionResponse),
            "/v1/completions": _generate("A completion", CompletionRequest, CompletionResponse),
            "/v1/embeddings": _post("Embeddings of one input or a batch (models whose engines embed)",
                                    EmbeddingRequest, EmbeddingResponse),
            "/v1/responses": _generate("A response (Responses API, served statelessly)", ResponsesRequest,
                                       ResponseObject),
            "/v1/models": {"get": {"summary": "Served models",
                                   "responses": {"200": {"description": "The list.", **_json(_ref(ModelList))}}}},
            "/v1/models/{model}": {"get": {
                "summary": "One served model, by name or alias",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The model.", **_json(_ref(ModelCard))}, **_errors(404)},
            }},
            "/v1/tokenize": _post("Token ids of a prompt or chat, by the model's tokenizer", TokenizeRequest,
                                  TokenizeResponse),
            "/v1/detokenize": _post("The text of token ids", DetokenizeRequest, DetokenizeResponse),
            "/health": {"get": {"summary": "Up", "responses": {"200": {"description": "The ingress is up."}}}},
        },
        "components": {"schemas": schemas},
    }
    return json.dumps(document).encode()
