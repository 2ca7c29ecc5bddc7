"""The OpenAI ingress deployment: HTTP routes for clients, and handle methods for Python batch jobs.

    handle = serve.get_app_handle("gateway")
    reply = handle.chat.remote({"model": "sim-llama", "messages": [...]}).result()
    async for chunk in handle.options(stream=True).chat_stream.remote({...}): ...

Handle methods take and return OpenAI-shaped dicts and raise app.api.errors.APIError on bad input.
"""

# No `from __future__ import annotations`: Serve rebuilds route signatures and needs real types.
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.api.http import OpenAIHTTP, install_error_handlers
from app.api.metrics import GatewayMetrics
from app.api.serving import Endpoint, EngineClient, OpenAIServing, ServedModel
from app.config import GatewayConfig, ModelConfig
from app.deployments.cluster_sync import RouterStateSync
from app.deployments.direct_stream import DirectStreamEngineClient, engine_streams_counter, new_http_client
from app.deployments.disaggregation import DisaggregatedEngineClient, DisaggregationMetrics
from app.deployments.engine_client import ServeEngineClient
from app.deployments.external_client import ExternalEngineClient
from app.deployments.routing import RoutedEngineClient, RouterMetrics
from app.engines.external.config import ExternalEngineConfig
from app.router.hashing import get_hasher
from app.router.scheduler import Scheduler
from app.router.state import ClusterState, ReplicaRole
from app.router.text_keys import ApproximateBlockKeys
from app.tokenizer import PromptTokenizer

logger = logging.getLogger("ray.serve")

def _load_tokenizer(model: ModelConfig) -> PromptTokenizer | None:
    folder = model.tokenizer_dir
    return PromptTokenizer.from_dir(folder) if folder is not None else None


def _text_keys(model: ModelConfig) -> ApproximateBlockKeys:
    assert isinstance(model.engine, ExternalEngineConfig)
    keys = ApproximateBlockKeys(model.engine.block_size, model.engine.chars_per_token)
    # Said once per ingress replica: routing still follows shared prefixes, but only roughly.
    logger.warning(
        "model %s has no tokenizer configured: the servers tokenize prompts themselves and the router keys "
        "prefixes on text (%d characters per block, about %s per token) instead of the servers' block hashes; "
        "set `tokenizer` on the model for exact keys and KV-event routing",
        model.name, keys.chars_per_block, model.engine.chars_per_token,
    )
    return keys


gateway_api = FastAPI(title="LLM gateway", description="OpenAI-compatible API over Ray Serve")
install_error_handlers(gateway_api)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2048)
@serve.ingress(gateway_api)
class OpenAIIngress:
    def __init__(self, config: dict[str, Any], engines: dict[str, dict[str, DeploymentHandle]]) -> None:
        gateway = GatewayConfig.model_validate(config)
        limits = gateway.ingress
        context = serve.get_replica_context()
        self.metrics = GatewayMetrics()
        self.router_metrics = RouterMetrics(self.metrics.registry)
        self.split_metrics = DisaggregationMetrics(self.metrics.registry)
        self.engine_streams = engine_streams_counter(self.metrics.registry)
        self.cluster = ClusterState(
            speculative_ttl_s=gateway.routing.speculative_ttl_s, stale_after_s=gateway.routing.stale_after_s
        )
        self.scheduler = Scheduler(self.cluster, gateway.routing)
        # Ray's PrefixCacheAffinityRouter and Serve's power-of-two pick inside the handle on their own.
        self.ranks_requests = gateway.routing.policy in ("prefix_aware", "round_robin")
        self.sync = RouterStateSync(context.app_name if context else "", self.cluster, gateway.cluster_state)
        self.sync.on_synced = self._publish_replica_load
        self._sync_task: asyncio.Task[None] | None = None
        self._stream_from_engines = limits.stream_from_engines
        self._node_id = ray.get_runtime_context().get_node_id()
        self._http = new_http_client()
        self._external_clients: dict[float, httpx.AsyncClient] = {}
        tokenizers = {model.name: _load_tokenizer(model) for model in gateway.models}
        models = [
            ServedModel(
                name=model.name,
                tokenizer=tokenizers[model.name],
                engine=self._engine_client(model, engines[model.name], limits.retry_after_s, tokenizers[model.name]),
                max_model_len=model.max_model_len,
                block_size=model.engine.block_size,
                hasher=get_hasher(model.engine.hash_algo, model.engine.hash_seed),
                aliases=tuple(model.aliases),
                include_prompt_text=gateway.routing.policy == "ray_prefix_cache_affinity",
                text_keys=_text_keys(model) if tokenizers[model.name] is None else None,
            )
            for model in gateway.models
        ]
        for served in models:
            self.router_metrics.prefix_keys.labels(
                served.name, "approximate" if served.approximate_keys else "exact"
            ).set(1)
        self.serving = OpenAIServing(
            models,
            metrics=self.metrics,
            max_inflight_requests=limits.max_inflight_requests,
            retry_after_s=limits.retry_after_s,
        )
        self.http = OpenAIHTTP(self.serving, max_body_bytes=limits.max_body_bytes)
        with contextlib.suppress(RuntimeError):  # no running loop: the first request starts it
            self._ensure_syncing()

    def _engine_client(
        self,
        model: ModelConfig,
        handles: dict[str, DeploymentHandle],
        retry_after_s: float,
        tokenizer: PromptTokenizer | None,
    ) -> EngineClient:
        clients: dict[str, EngineClient] = {}
        if isinstance(model.engine, ExternalEngineConfig):
            # Servers the gateway does not run: always ranked by its own scheduler, called directly.
            external = model.engine
            clients["mixed"] = ExternalEngineClient(
                self.cluster, self._external_http(external.connect_timeout_s), model=model.name,
                served_model_name=external.served_model_name or model.name, tokenizer=tokenizer,
                max_attempts=external.max_attempts, avoid_failed_for_s=external.down_after_s,
                retry_after_s=retry_after_s, streams=self.engine_streams,
            )
            handles = {}
        for role, handle in handles.items():
            # A failed prefill is not retried: the decode replica computing the prompt is faster.
            retry = role != "prefill"
            client: EngineClient = ServeEngineClient(
                handle, retry_after_s=retry_after_s, max_attempts=3 if retry else 1
            )
            if self._stream_from_engines:
                client = DirectStreamEngineClient(
                    client, self.cluster, self._http, served_model_name=model.name,
                    tokenizer=tokenizer,
                    node_id=self._node_id, retry=retry, retry_after_s=retry_after_s, streams=self.engine_streams,
                )
            clients[role] = client
        split = model.disaggregation
        if split is None and not self.ranks_requests and not model.is_external:
            return clients["mixed"]

        def routed(roles: tuple[ReplicaRole, ...]) -> RoutedEngineClient:
            return RoutedEngineClient(
                {role: clients[role] for role in roles if role in clients},
                model=model.name,
                block_size=model.engine.block_size,
                scheduler=self.scheduler,
                sync=self.sync,
                metrics=self.router_metrics,
                roles=roles,
                on_request=self._ensure_syncing,
            )

        if split is None:
            return routed(("mixed",))
        # The split needs the gateway's own scheduler whatever the policy: it picks decode first.
        return DisaggregatedEngineClient(
            routed(("decode", "mixed")),
            routed(("prefill",)),
            model=model.name,
            min_split_tokens=split.min_split_tokens,
            prefill_timeout_s=split.prefill_timeout_s,
            metrics=self.split_metrics,
        )

    def _external_http(self, connect_timeout_s: float) -> httpx.AsyncClient:
        client = self._external_clients.get(connect_timeout_s)
        if client is None:
            client = self._external_clients[connect_timeout_s] = new_http_client(connect_timeout_s)
        return client

    def _ensure_syncing(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self.sync.run())

    def _publish_replica_load(self) -> None:
        gauge = self.router_metrics.replica_load
        for replica in self.cluster.replicas.values():
            labels = (replica.info.model, replica.replica_id)
            gauge.labels(*labels, "inflight").set(replica.inflight)
            gauge.labels(*labels, "running").set(replica.stats.num_requests_running)
            gauge.labels(*labels, "waiting").set(replica.stats.num_requests_waiting)
            gauge.labels(*labels, "kv_cache_usage").set(replica.stats.kv_cache_usage_perc)
        self.router_metrics.state_age.set(0.0)

    async def routing_state(self) -> dict[str, Any]:
        """This ingress replica's view of the fleet (for operators and tests)."""
        self._ensure_syncing()
        now = time.monotonic()
        return {
            "router_id": self.sync.router_id,
            "fresh": self.cluster.is_fresh(now),
            "policy": self.scheduler.config.policy,
            "ttft_model": self.scheduler.ttft_model.coefficients,
            "replicas": {
                rid: {
                    "role": s.info.role,
                    "inflight": s.inflight,
                    "blocks": self.cluster.index.num_blocks(rid),
                    "load": s.load,
                    "engine_stats": s.stats.model_dump(mode="json"),
                }
                for rid, s in self.cluster.replicas.items()
            },
        }

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
        self.router_metrics.state_age.set(max(0.0, time.monotonic() - self.cluster.synced_at))
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
