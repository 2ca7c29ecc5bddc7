"""The HTTP face of the OpenAI API: bodies in, JSON or server-sent events out, errors as OpenAI sends them.

Handlers take a Starlette request and return a response, so the Serve ingress (routes declared on
its class) and the standalone simulator server (a plain FastAPI app) share them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.openai.engine_serving import Endpoint, OpenAIServing
from app.openai.errors import APIError, invalid_field, json_body, too_large

logger = logging.getLogger(__name__)
T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers())


class OpenAIHTTP:
    """HTTP handlers over an OpenAIServing."""

    def __init__(self, serving: OpenAIServing, *, max_body_bytes: int) -> None:
        self.serving = serving
        self.max_body_bytes = max_body_bytes
        self.received: deque[object] = deque(maxlen=64)
        """The latest request bodies as they arrived: what a client (or a gateway in front) sent, for tests
        that check no field was dropped on the way."""

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate("chat", request)

    async def completions(self, request: Request) -> Response:
        return await self._generate("completions", request)

    async def embeddings(self, request: Request) -> Response:
        try:
            answer = await self.serving.embed(await self._read_json(request))
            return Response(answer.model_dump_json(), media_type="application/json")
        except APIError as error:
            return error_response(error)

    async def responses(self, request: Request) -> Response:
        try:
            body = await self._read_json(request)
            if isinstance(body, dict) and body.get("stream") is True:
                events = self.serving.respond_stream(body)
                first = await _first(events)
                return StreamingResponse(_typed_sse(first, events), media_type="text/event-stream",
                                         headers=SSE_HEADERS)
            answer = await self.serving.respond(body)
            return Response(answer.model_dump_json(), media_type="application/json")
        except APIError as error:
            return error_response(error)

    def models(self) -> JSONResponse:
        return JSONResponse(self.serving.list_models().model_dump())

    def model(self, model_id: str) -> JSONResponse:
        return JSONResponse(self.serving.model_card(model_id).model_dump())

    def metrics(self) -> Response:
        return Response(self.serving.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    async def _generate(self, endpoint: Endpoint, request: Request) -> Response:
        try:
            body = await self._read_json(request)
            if isinstance(body, dict) and body.get("stream") is True:
                return await self._stream(endpoint, body)
            response = await self.serving.create(endpoint, body)
            return Response(response.model_dump_json(), media_type="application/json")
        except APIError as error:
            return error_response(error)

    async def _stream(self, endpoint: Endpoint, body: dict) -> Response:
        chunks = self.serving.stream(endpoint, body)
        first = await _first(chunks)
        return StreamingResponse(_sse(first, chunks), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _read_json(self, request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large(self.max_body_bytes)
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > self.max_body_bytes:
                raise too_large(self.max_body_bytes)
        parsed = json_body(body, request.headers.get("content-type"))
        self.received.append(parsed)
        return parsed


async def _first(items: AsyncIterator[T]) -> T | None:
    """Wait for a stream's first item, so that errors found before generation starts (validation, unknown
    model, overload) get a real status code rather than a 200 with an error event."""
    try:
        return await anext(items)
    except StopAsyncIteration:
        return None
    except BaseException:
        await items.aclose()  # type: ignore[attr-defined]
        raise


async def _typed_sse(first: dict[str, Any] | None, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """The Responses API's stream: each event named by its type, and no [DONE] (its last event says it)."""
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        try:
            if first is not None:
                yield _typed_event(first)
            async for event in events:
                yield _typed_event(event)
        except APIError as error:
            yield _typed_event({"type": "error", "code": error.code, "message": error.message, "param": error.param})


def _typed_event(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: ".encode() + json.dumps(event).encode() + b"\n\n"


async def _sse(first: BaseModel | None, chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(chunks):
        try:
            if first is not None:
                yield _event(first.model_dump_json())
            async for chunk in chunks:
                yield _event(chunk.model_dump_json())
        except APIError as error:
            # Headers are gone already: report in-band, as OpenAI and vLLM do.
            yield _event(json.dumps(error.to_dict()))
    yield b"data: [DONE]\n\n"


def _event(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """Make every error FastAPI itself raises (unknown route, wrong method, ...) OpenAI-shaped."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_field(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(APIError(500, "The gateway failed to serve this request; see its logs."))
