"""The gateway's HTTP face as a bare ASGI app: routes, bodies in, bytes out, errors as OpenAI sends them.

No web framework on the way: every streamed token passes through here, and a framework's routing,
middleware and per-chunk machinery cost more CPU than the relay itself (benchmarks/README.md, "The
data path"). The same app serves the gateway's own listener (app/http_listener.py) and Serve's HTTP
proxy (the ingress deployment hands it to Serve), so both paths behave alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from app.api.gateway_serving import GatewayResponse, GatewayServing
from app.api.openapi import openapi_document
from app.openai.errors import APIError, json_body, too_large
from app.openai.prepare import Endpoint

logger = logging.getLogger("ray.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_GENERATE: dict[str, Endpoint] = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                                  "/v1/embeddings": "embeddings", "/v1/responses": "responses"}
_READ = ("/v1/models", "/health", "/metrics", "/openapi.json")
_MODEL_PREFIX = "/v1/models/"
_TOKENS = ("/v1/tokenize", "/v1/detokenize", "/tokenize", "/detokenize")  # vLLM serves both spellings


class GatewayASGI:
    """The OpenAI routes of the gateway, plus /health and /metrics."""

    def __init__(
        self,
        serving: GatewayServing,
        *,
        max_body_bytes: int,
        metrics: Callable[[], bytes],
    ) -> None:
        self.serving = serving
        self.max_body_bytes = max_body_bytes
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return
        path = _route_path(scope)
        method = scope["method"]
        try:
            endpoint = _GENERATE.get(path)
            if endpoint is not None:
                if method != "POST":
                    raise APIError(405, "Method Not Allowed")
                await self._generate(endpoint, scope, receive, send)
            elif path in _TOKENS:
                if method != "POST":
                    raise APIError(405, "Method Not Allowed")
                body = await self._read_json(scope, receive)
                preparer = self.serving.preparer
                answer = await preparer.tokenize(body) if path.endswith("/tokenize") else preparer.detokenize(body)
                await _send(send, 200, _JSON, answer.model_dump_json().encode())
            elif path.startswith(_MODEL_PREFIX) and len(path) > len(_MODEL_PREFIX):
                if method not in ("GET", "HEAD"):
                    raise APIError(405, "Method Not Allowed")
                card = self.serving.model_card(path[len(_MODEL_PREFIX):])
                await _send(send, 200, _JSON, card.model_dump_json().encode())
            elif path not in _READ:
                raise APIError(404, "Not Found")
            elif method not in ("GET", "HEAD"):
                raise APIError(405, "Method Not Allowed")
            elif path == "/v1/models":
                await _send(send, 200, _JSON, self.serving.list_models().model_dump_json().encode())
            elif path == "/health":
                await _send(send, 200, _JSON, b'{"status":"ok"}')
            elif path == "/openapi.json":
                await _send(send, 200, _JSON, openapi_document())
            else:
                await _send(send, 200, [(b"content-type", PROMETHEUS_CONTENT_TYPE)], self._metrics())
        except APIError as error:
            await _send_error(send, error)

    async def _generate(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_json(scope, receive)
        sticky = self.serving.traffic.sticky_header_bytes
        wanted = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
                  if name in sticky} if sticky else None
        response = await self.serving.open(endpoint, body, wanted)
        try:
            headers = [*(_SSE if response.stream else [(b"content-type", response.media_type.encode())]),
                       (b"x-request-id", response.request_id.encode())]
            if response.target is not None:
                headers.append((b"x-gateway-target", response.target.encode()))
            if not response.stream:
                await _send(send, 200, headers, response.first)
                return
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await _relay(response, receive, send)
        finally:
            await response.aclose()

    async def _read_json(self, scope: Scope, receive: Receive) -> object:
        limit = self.max_body_bytes
        content_type: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise too_large(limit)
            if name == b"content-type":
                content_type = value
        pieces: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError
            piece = message.get("body", b"")
            if piece:
                size += len(piece)
                if size > limit:
                    raise too_large(limit)
                pieces.append(piece)
            if not message.get("more_body"):
                break
        return json_body(pieces[0] if len(pieces) == 1 else b"".join(pieces), content_type)


async def _relay(response: GatewayResponse, receive: Receive, send: Send) -> None:
    """Send a stream; if the client goes away, stop (closing the response aborts the engine's request)."""
    relaying = asyncio.current_task()
    assert relaying is not None
    gone = False

    def client_gone(watch: asyncio.Task[dict[str, Any]]) -> None:
        nonlocal gone
        if not watch.cancelled() and watch.exception() is None and watch.result()["type"] == "http.disconnect":
            gone = True
            relaying.cancel()

    # The body has been read, so the next message can only be the disconnect.
    watch = asyncio.ensure_future(receive())
    watch.add_done_callback(client_gone)
    try:
        await send({"type": "http.response.body", "body": response.first, "more_body": True})
        async for data in response.rest():
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not gone:
            raise
        relaying.uncancel()  # our own cancel, to stop relaying: the handler ends normally
    finally:
        watch.remove_done_callback(client_gone)
        watch.cancel()


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path.rstrip("/") or "/"


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, error: APIError) -> None:
    headers = [*_JSON, *((name.lower().encode(), value.encode()) for name, value in error.headers().items())]
    with contextlib.suppress(Exception):  # the client may be gone, or the response already started
        await _send(send, error.status_code, headers, json.dumps(error.to_dict()).encode())


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
