"""The OpenAI ingress deployment: HTTP routes for clients, and handle methods for Python batch jobs.

    handle = serve.get_app_handle("gateway")
    reply = handle.chat.remote({"model": "sim-llama", "messages": [...]}).result()
    async for chunk in handle.options(stream=True).chat_stream.remote({...}): ...

Handle methods take and return OpenAI-shaped dicts and raise app.api.errors.APIError on bad input.
"""

# No `from __future__ import annotations`: Serve rebuilds route signatures and needs real types.
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.api.http import OpenAIHTTP, install_error_handlers
from app.api.serving import Endpoint, OpenAIServing, ServedModel
from app.config import GatewayConfig
from app.deployments.engine_client import ServeEngineClient
from app.tokenizer import PromptTokenizer

gateway_api = FastAPI(title="LLM gateway", description="OpenAI-compatible API over Ray Serve")
install_error_handlers(gateway_api)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2048)
@serve.ingress(gateway_api)
class OpenAIIngress:
    def __init__(self, config: dict[str, Any], engines: dict[str, DeploymentHandle]) -> None:
        gateway = GatewayConfig.model_validate(config)
        limits = gateway.ingress
        models = [
            ServedModel(
                name=model.name,
                tokenizer=PromptTokenizer.from_dir(model.tokenizer_dir),
                engine=ServeEngineClient(engines[model.name], retry_after_s=limits.retry_after_s),
                max_model_len=model.max_model_len,
                block_size=model.engine.block_size,
                hash_seed=model.engine.hash_seed,
                aliases=tuple(model.aliases),
            )
            for model in gateway.models
        ]
        self.serving = OpenAIServing(
            models, max_inflight_requests=limits.max_inflight_requests, retry_after_s=limits.retry_after_s
        )
        self.http = OpenAIHTTP(self.serving, max_body_bytes=limits.max_body_bytes)

    # -- HTTP ----------------------------------------------------------------------------------

    @gateway_api.post("/v1/chat/completions")
    async def chat_completions_http(self, request: Request) -> Response:
        return await self.http.chat_completions(request)

    @gateway_api.post("/v1/completions")
    async def completions_http(self, request: Request) -> Response:
        return await self.http.completions(request)

    @gateway_api.get("/v1/models")
    async def models_http(self) -> JSONResponse:
        return self.http.models()

    @gateway_api.get("/health")
    async def health_http(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @gateway_api.get("/metrics")
    async def metrics_http(self) -> Response:
        return self.http.metrics()

    # -- Python handle API (batch jobs) --------------------------------------------------------

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat completion as a dict, like `client.chat.completions.create(...).model_dump()`."""
        return await self._create("chat", body)

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._create("completions", body)

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Chat completion chunks as dicts; call with `handle.options(stream=True)`."""
        async for chunk in self._stream("chat", body):
            yield chunk

    async def completions_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self._stream("completions", body):
            yield chunk

    async def list_models(self) -> dict[str, Any]:
        return self.serving.list_models().model_dump()

    async def _create(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.serving.create(endpoint, {**body, "stream": False})
        return response.model_dump(mode="json")

    async def _stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with contextlib.aclosing(self.serving.stream(endpoint, {**body, "stream": True})) as chunks:
            async for chunk in chunks:
                yield chunk.model_dump(mode="json")
