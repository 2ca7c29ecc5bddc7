"""The engine deployment: one engine per replica, with its OpenAI server, registered with the router.

Every engine replica has an OpenAI HTTP server: real vLLM's own, or (simulated engines) the project's
simulated server run inside the replica. Ingresses send requests straight to it and relay its answers
as bytes; an ingress that cannot reach it (a loopback server on another node) goes through `relay`,
which forwards the same call over the Serve handle. Each replica registers with the application's
cluster-state actor and streams its stats and KV events there in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from app.config import ClusterStateConfig, ModelConfig
from app.deployments.state_sync import AdapterSync, EngineReporter
from app.engines.adapter_catalog import AdapterCatalog, ServerAdapterAdmin
from app.engines.kinds import create_engine
from app.gateway.relay import ForwardedCall
from app.protocol.engine import AdapterLoad, EngineRequest, EngineStats, EngineUnavailableError
from app.router.state import ReplicaInfo, ReplicaRole, ReplicaStats
from app.tokenizer import PromptTokenizer
from app.upstream import UpstreamError, UpstreamPool


@dataclass(frozen=True)
class RelayHead:
    """The first item `EngineServer.relay` yields: the server's status, and who answered."""

    status: int
    replica_id: str

serve_logger = logging.getLogger("ray.serve")  # Serve's logger reaches the replica log and the console


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, health_check_period_s=5)
class EngineServer:
    async def __init__(
        self, model: dict[str, Any], cluster_state: dict[str, Any] | None = None, role: ReplicaRole = "mixed",
        args_digest: str = "",
    ) -> None:
        """`args_digest`: identifies the application's args (live settings belong to one version of them)."""
        config = ModelConfig.model_validate(model)
        engine_config = config.engine_for(role)
        self.role = role
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context else "local"
        self._reporter_task: asyncio.Task[None] | None = None
        self._adapter_task: asyncio.Task[None] | None = None
        self.engine = create_engine(
            engine_config,
            PromptTokenizer.from_dir(config.tokenizer_dir),
            model=config.name,
            max_model_len=config.max_model_len,
            engine_id=self.replica_id,
            host_ip=ray.util.get_node_ip_address(),
            role=role,
            adapters=config.adapter_paths,
        )
        # A real engine takes a while to load; the replica is not ready (and gets no traffic)
        # until it serves. A failed start fails the replica with the engine's own last log lines.
        started = time.monotonic()
        await self.engine.start()
        serve_logger.info("engine %s ready in %.1fs (model %s, role %s)", self.engine.engine_id,
                          time.monotonic() - started, config.name, role)
        self._pool = UpstreamPool()
        # Every kind serves its own OpenAI API: a vLLM server has its URL; the simulator starts one here.
        self.endpoint_url: str | None = getattr(self.engine, "endpoint_url", None)
        serve_http = getattr(self.engine, "serve_http", None)
        if self.endpoint_url is None and serve_http is not None:
            self.endpoint_url = await serve_http(ray.util.get_node_ip_address())
        cache = self.engine.cache_config
        info = ReplicaInfo(
            replica_id=self.replica_id,
            model=config.name,
            role=role,
            engine_id=self.engine.engine_id,
            block_size=cache.block_size,
            num_gpu_blocks=cache.num_gpu_blocks,
            max_num_seqs=engine_config.max_num_seqs,
            hash_algo=cache.prefix_caching_hash_algo,
            hash_seed=cache.hash_seed,
            kv_events=True,
            lists_adapters=config.adapters_changeable and self.endpoint_url is not None,
            endpoint_url=self.endpoint_url,
            node_id=ray.get_runtime_context().get_node_id(),
        )
        self.reporter = EngineReporter(
            context.app_name if context else "",
            info,
            self.engine,
            self._routing_stats,
            ClusterStateConfig.model_validate(cluster_state or {}),
        )
        # Adapters come and go while serving (app/config/live.py); the live settings reach engines through
        # the state actor, like the routers' state.
        self.catalog: AdapterCatalog | None = None
        if config.adapters_changeable and self.endpoint_url is not None:
            self.catalog = AdapterCatalog(ServerAdapterAdmin(self._pool, self.endpoint_url), config.adapter_paths)
        self._max_loras = getattr(engine_config, "max_loras", 0)
        self._adapters = AdapterSync(context.app_name if context else "", config.name,
                                     ClusterStateConfig.model_validate(cluster_state or {}), args_digest)
        self._ensure_reporting()

    def _ensure_reporting(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reporter_task is None or self._reporter_task.done():
            self._reporter_task = loop.create_task(self.reporter.run())
        if self.catalog is not None and (self._adapter_task is None or self._adapter_task.done()):
            self._adapter_task = loop.create_task(self._adapters.run(self.catalog, self._busy_adapters))

    def _busy_adapters(self) -> set[str]:
        adapters = self.engine.stats().adapters
        return set() if adapters is None else {*adapters.running, *adapters.waiting}

    def _routing_stats(self) -> ReplicaStats:
        load = self.engine.stats().load()
        if self.catalog is not None:
            adapters = load.adapters or AdapterLoad(max_loras=self._max_loras)
            load.adapters = adapters.model_copy(update={"served": sorted(self.catalog.serving)})
        return load

    async def adapters(self) -> dict[str, Any]:
        """The adapters this replica serves and those the live settings want (for operators and tests)."""
        if self.catalog is None:
            return {"serving": {}, "wanted": {}}
        return {"serving": dict(self.catalog.serving), "wanted": dict(self.catalog.wanted)}

    async def relay(self, request: EngineRequest, call: ForwardedCall) -> AsyncIterator[Any]:
        """A forwarded call answered by this replica's server, for an ingress that cannot reach the server
        itself: first a RelayHead, then the answer's body as it arrives, unparsed."""
        self._ensure_reporting()
        if self.endpoint_url is None:
            raise EngineUnavailableError(f"engine replica {self.replica_id} has no server (server_host: null)")
        try:
            response = await self._pool.request(self.endpoint_url, call.path, call.payload())
        except UpstreamError as error:
            raise EngineUnavailableError(f"engine replica {self.replica_id}: its server failed: {error}") from None
        try:
            yield RelayHead(response.status, self.replica_id)
            async for piece in response.pieces():
                yield piece
        except UpstreamError as error:
            raise EngineUnavailableError(f"engine replica {self.replica_id}: its server failed: {error}") from None
        finally:
            response.close()  # the caller went away early: the engine aborts the request

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def engine_url(self) -> str | None:
        """The engine's own OpenAI server, as ingresses reach it."""
        return self.endpoint_url

    def record_routing_stats(self) -> dict[str, Any]:
        """Published to Serve request routers (replica.routing_stats)."""
        return self.engine.stats().model_dump(mode="json")

    async def check_health(self) -> None:
        self._ensure_reporting()
        if not self.engine.healthy:
            raise RuntimeError(f"the engine {self.engine.engine_id} has stopped; Serve will replace this replica")

    async def __del__(self) -> None:
        if self._adapter_task is not None:
            self._adapter_task.cancel()
        if self._reporter_task is not None:
            self._reporter_task.cancel()
            await self.reporter.unregister()
        await self.engine.shutdown()
