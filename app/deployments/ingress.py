"""The OpenAI ingress deployment: the gateway's HTTP face, and handle methods for Python batch jobs.

Clients reach it on its own listener (`ingress.listen`, the default path: no proxy hop) or through
Serve's HTTP proxy; both run the same ASGI app. Python batch jobs on the cluster call it directly:

    handle = serve.get_app_handle("gateway")
    reply = handle.chat.remote({"model": "sim-llama", "messages": [...]}).result()
    async for chunk in handle.options(stream=True).chat_stream.remote({...}): ...

Handle methods take and return OpenAI-shaped dicts and raise app.openai.errors.APIError on bad input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import ray
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.api.asgi import GatewayASGI
from app.api.gateway_serving import GatewayServing
from app.config import ConfigError, GatewayConfig, ModelConfig
from app.config.gateway import AdapterConfig
from app.config.live import LiveConfig, LiveState, applied, digest, live_state_of, merged
from app.deployments.serve_transport import ServeTransport
from app.deployments.state_sync import RouterStateSync
from app.engines.external.config import ExternalEngineConfig
from app.engines.kinds import kind_of
from app.gateway.client import EngineClient
from app.gateway.client_builder import ClientBuilder, ModelPlan, Reach, SplitPlan
from app.gateway.fleet_load import ClusterFleetLoad
from app.gateway.metrics import DisaggregationMetrics, RouterMetrics, engine_streams_counter
from app.gateway.routed import HTTPTransport, RoutedClient
from app.gateway.split import SplitClient
from app.http_listener import HTTPListener
from app.kv.hashing import get_hasher
from app.kv.text_keys import ApproximateBlockKeys
from app.openai.metrics import ServingMetrics
from app.openai.prepare import Endpoint, ServedModel
from app.router.admission.registry import build_stages
from app.router.scheduler import Scheduler
from app.router.state import ClusterState
from app.router.traffic import TrafficSplit
from app.tokenizer import PromptTokenizer
from app.upstream import UpstreamPool

logger = logging.getLogger("ray.serve")


def _parse_traffic(traffic: dict[str, Any]) -> dict[str, TrafficSplit]:
    try:
        return {name: TrafficSplit.model_validate(split) for name, split in traffic.items()}
    except ValidationError as error:
        raise ValueError(f"invalid traffic splits: {error}") from None


def _with_adapters(live: LiveState, model: str, adapters: dict[str, str]) -> LiveState:
    return live.model_copy(update={"adapters": {**live.adapters, model: adapters}})


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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2048)
@serve.ingress()
class OpenAIIngress:
    async def __init__(self, config: dict[str, Any], engines: dict[str, dict[str, DeploymentHandle]]) -> None:
        gateway = GatewayConfig.model_validate(config)
        limits = gateway.ingress
        context = serve.get_replica_context()
        self.metrics = ServingMetrics()
        self.router_metrics = RouterMetrics(self.metrics.registry)
        self.split_metrics = DisaggregationMetrics(self.metrics.registry)
        self.engine_streams = engine_streams_counter(self.metrics.registry)
        self.cluster = ClusterState(
            speculative_ttl_s=gateway.routing.speculative_ttl_s, stale_after_s=gateway.routing.stale_after_s
        )
        self.scheduler = Scheduler(self.cluster, gateway.routing)
        self.sync = RouterStateSync(context.app_name if context else "", self.cluster, gateway.cluster_state,
                                    on_live=self._live_changed)
        self.start_config = gateway
        self.live = live_state_of(gateway)
        self._sync_task: asyncio.Task[None] | None = None
        self._stream_from_engines = limits.stream_from_engines
        self._node_id = ray.get_runtime_context().get_node_id()
        self._pools: dict[float, UpstreamPool] = {}
        self.clients = ClientBuilder(
            self.scheduler, router_metrics=self.router_metrics, split_metrics=self.split_metrics,
            streams=self.engine_streams, speculate=self.sync.speculated, on_request=self._ensure_syncing,
            ranks_requests=gateway.routing.ranks_at_gateway,
        )
        tokenizers = {model.name: _load_tokenizer(model) for model in gateway.models}
        self._bases = {model.name: served for model, served in zip(gateway.models, [
            ServedModel(
                name=model.name,
                tokenizer=tokenizers[model.name],
                engine=self._client(model, engines[model.name]),
                max_model_len=model.max_model_len,
                block_size=model.engine.block_size,
                hasher=get_hasher(model.engine.hash_algo, model.engine.hash_seed),
                aliases=tuple(model.aliases),
                include_prompt_text=gateway.routing.policy == "ray_prefix_cache_affinity",
                text_keys=_text_keys(model) if tokenizers[model.name] is None else None,
                engine_model_name=(model.engine.served_model_name
                                   if isinstance(model.engine, ExternalEngineConfig) else None),
                ignored_fields=kind_of(model.engine).ignored_fields,
            )
            for model in gateway.models
        ], strict=True)}
        models = self._served_models(gateway)
        self.fleet_load = ClusterFleetLoad(self.cluster)
        for served in models:
            if isinstance(served.engine, RoutedClient | SplitClient):  # the unranked baselines queue in Serve
                self.fleet_load.watch_queue(served.name, lambda engine=served.engine: engine.queued)
        self.serving = GatewayServing(
            models,
            metrics=self.metrics,
            max_inflight_requests=limits.max_inflight_requests,
            retry_after_s=limits.retry_after_s,
            admission_stages=build_stages(limits.admission, retry_after_s=limits.retry_after_s),
            fleet=self.fleet_load,
            traffic=gateway.traffic,
        )
        self.asgi = GatewayASGI(self.serving, max_body_bytes=limits.max_body_bytes, metrics=self._metrics_page)
        self._ensure_syncing()
        # Serve calls `reconfigure` only after __init__; the listener below takes requests at once, so
        # the user_config's adapters and splits must be in force before it starts.
        self.sync.args_digest = digest(config)
        await self._adopt_live(getattr(getattr(context, "_deployment_config", None), "user_config", None))
        self.listener: HTTPListener | None = None
        if limits.listen is not None:
            # Last: the replica takes connections only once it can serve them.
            listen = limits.listen
            self.listener = HTTPListener(self.asgi, listen.host, listen.port,
                                         share_with=f"gateway application {context.app_name if context else ''!r}",
                                         keep_alive_s=listen.keep_alive_s, name="gateway listener")
            await self.listener.start()
            logger.info("gateway listening on http://%s:%d", listen.host, listen.port)

    def _served_models(self, config: GatewayConfig) -> list[ServedModel]:
        """The base models, then each adapter: a model name of its own on its base's engines and routing."""
        models = list(self._bases.values()) + [
            replace(self._bases[model.name], name=name, aliases=(), adapter_of=model.name, adapter_path=path)
            for model in config.models for name, path in model.adapter_paths.items()]
        for served in models:
            self.router_metrics.prefix_keys.labels(
                served.name, "approximate" if served.approximate_keys else "exact"
            ).set(1)
        return models

    def __serve_build_asgi_app__(self) -> GatewayASGI:
        """What Serve's HTTP proxy sends requests to: the same app as the gateway's own listener."""
        return self.asgi

    # -- engine clients ------------------------------------------------------------------------

    def _pool(self, connect_timeout_s: float) -> UpstreamPool:
        pool = self._pools.get(connect_timeout_s)
        if pool is None:
            pool = self._pools[connect_timeout_s] = UpstreamPool(connect_timeout_s=connect_timeout_s)
        return pool

    def _client(self, model: ModelConfig, handles: dict[str, DeploymentHandle]) -> EngineClient:
        if isinstance(model.engine, ExternalEngineConfig):
            # Servers the gateway does not run: always ranked by its own scheduler, called directly.
            external = model.engine
            plan = ModelPlan(
                name=model.name, block_size=external.block_size,
                max_ongoing={"mixed": external.max_ongoing_requests},
                max_queued={"mixed": external.max_queued_requests},
                max_attempts=external.max_attempts, avoid_failed_for_s=external.down_after_s,
            )
            return self.clients.build(
                plan, Reach(http=HTTPTransport(self._pool(external.connect_timeout_s)), node_id=self._node_id)
            )
        # Engines the gateway runs take what their deployment says one replica takes; the queue beyond
        # it is the gateway's, bounded like Serve's own handle queue (-1: unbounded).
        groups = {role: model.group(role) for role in model.roles}
        split = model.disaggregation
        plan = ModelPlan(
            name=model.name, block_size=model.engine.block_size,
            max_ongoing={role: group.max_ongoing_requests for role, group in groups.items()},
            max_queued={role: None if group.max_queued_requests == -1 else group.max_queued_requests
                        for role, group in groups.items()},
            split=None if split is None else SplitPlan(split.min_split_tokens, split.prefill_timeout_s),
        )
        reach = Reach(
            by_role={role: ServeTransport(handle) for role, handle in handles.items()},
            http=HTTPTransport(self._pool(5.0)) if self._stream_from_engines else None,
            node_id=self._node_id,
        )
        return self.clients.build(plan, reach)

    # -- cluster state -------------------------------------------------------------------------

    def _ensure_syncing(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            with contextlib.suppress(RuntimeError):  # no running loop: the first request starts it
                self._sync_task = asyncio.get_running_loop().create_task(self.sync.run())

    def _publish_replica_load(self) -> None:
        # At scrape time, not at every sync: nobody reads the gauges in between.
        gauge = self.router_metrics.replica_load
        for replica in self.cluster.replicas.values():
            labels = (replica.info.model, replica.replica_id)
            gauge.labels(*labels, "inflight").set(replica.inflight)
            gauge.labels(*labels, "running").set(replica.stats.num_requests_running)
            gauge.labels(*labels, "waiting").set(replica.stats.num_requests_waiting)
            gauge.labels(*labels, "kv_cache_usage").set(replica.stats.kv_cache_usage_perc)
            self.router_metrics.metrics_dialect.labels(*labels, replica.info.metrics_dialect).set(1)
            adapters = replica.stats.adapters
            if adapters is not None:
                lora = self.router_metrics.replica_adapters
                lora.labels(*labels, "slots").set(adapters.max_loras)
                lora.labels(*labels, "running").set(len(adapters.running))
                lora.labels(*labels, "waiting").set(len(adapters.waiting))
                if adapters.loaded is not None:
                    lora.labels(*labels, "loaded").set(len(adapters.loaded))
                lora.labels(*labels, "loads").set(adapters.loads)
                lora.labels(*labels, "evictions").set(adapters.evictions)

    def _metrics_page(self) -> bytes:
        self._publish_replica_load()
        self.router_metrics.state_age.set(max(0.0, time.monotonic() - self.cluster.synced_at))
        return self.metrics.render()

    async def routing_state(self) -> dict[str, Any]:
        """This ingress replica's view of the fleet (for operators and tests)."""
        self._ensure_syncing()
        now = time.monotonic()
        return {
            "router_id": self.sync.router_id,
            "fresh": self.cluster.is_fresh(now),
            "policy": self.scheduler.config.policy,
            "profile": self.scheduler.pipeline.name,
            "ttft_model": self.scheduler.ttft_model.coefficients,
            "listening": None if self.listener is None else f"{self.listener.host}:{self.listener.port}",
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

    async def routing_keys(self, endpoint: Endpoint, body: dict[str, Any]) -> list[int]:
        """The block keys this gateway routes a request on (for operators comparing them with the engines'
        KV events: for exact keys, each is the hash of a block the engine stores for the same prompt)."""
        prepared = await self.serving.preparer.prepare(self.serving.preparer.validate(endpoint, body))
        return list(prepared.engine_request.block_hashes)

    # -- Python handle API (batch jobs) --------------------------------------------------------

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat completion as a dict, like `client.chat.completions.create(...).model_dump()`."""
        return await self.serving.create("chat", body)

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.serving.create("completions", body)

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Chat completion chunks as dicts; call with `handle.options(stream=True)`."""
        async for chunk in self._stream("chat", body):
            yield chunk

    async def completions_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self._stream("completions", body):
            yield chunk

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        """Embeddings as a dict, like `client.embeddings.create(...).model_dump()`."""
        return await self.serving.create("embeddings", body)

    async def responses(self, body: dict[str, Any]) -> dict[str, Any]:
        """A Responses API answer as a dict (stateless: send the whole conversation as `input`)."""
        return await self.serving.create("responses", body)

    async def responses_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The Responses API's typed events as dicts; call with `handle.options(stream=True)`."""
        async for event in self._stream("responses", body):
            yield event

    async def list_models(self) -> dict[str, Any]:
        return self.serving.list_models().model_dump()

    # -- live settings: traffic splits and adapters, changed without a restart ----------------

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve's in-place update (the ingress deployment's `user_config`, app/config/live.py), at start
        and on every `serve deploy` that changes it. A setting that cannot be served is logged and counted
        (gateway_live_config_errors_total), and what is in force keeps serving: raising here would make
        Serve replace this replica, and every new one would fail the same way."""
        await self._adopt_live(user_config)

    async def _adopt_live(self, user_config: dict[str, Any] | None) -> None:
        """Put in force this replica's settings (the args', with `user_config`), or those the app's other
        replicas have in force since (see ClusterStateActor.offer_live)."""
        try:
            state = merged(live_state_of(self.start_config), LiveConfig.model_validate(user_config or {}))
            applied(self.start_config, state)  # checked before it reaches the other replicas
        except (ValidationError, ConfigError) as error:
            self._live_error("the ingress user_config", error)
            return
        offered, in_force = state.model_dump(mode="json"), None
        for attempt in range(6):  # the actor may be starting
            try:
                in_force = await self.sync.offer_live(digest(user_config) if user_config is not None else "", offered)
                break
            except Exception as error:
                if attempt == 5:
                    logger.warning("live settings not shared through the cluster state actor (%s); in force on "
                                   "this replica only", error)
                else:
                    await asyncio.sleep(0.2 * 2**attempt)
        self._live_changed(in_force or offered)

    async def set_traffic(self, traffic: dict[str, Any]) -> dict[str, dict[str, float]]:
        """Put traffic splits in force on every ingress replica, within a sync round (well under a second),
        without a restart: the whole set, as the config's `traffic` section writes it. A rollout step or a
        rollback is this call with other weights. A split that cannot be served raises ValueError naming
        the problem, and the splits in force stay. Returns the weights now in force."""
        change = LiveConfig(traffic=_parse_traffic(traffic))
        await self._change_live(lambda live: merged(live, change))
        return await self.traffic()

    async def set_adapters(self, model: str, adapters: list[dict[str, Any]], wait_s: float = 60.0) -> dict[str, Any]:
        """Make `adapters` ([{name, source}], the whole list) the LoRA adapters of `model`, without a restart:
        new ones are loaded onto its engines, removed ones are refused from now on and unloaded from each
        engine once its requests for them finish. Checked first (folders, names, splits that target them);
        a bad list raises ValueError and nothing changes. Waits up to `wait_s` for every engine replica to
        serve the new ones; returns {name: replicas serving it}."""
        try:
            change = LiveConfig(adapters={model: [AdapterConfig.model_validate(a) for a in adapters]})
        except ValidationError as error:
            raise ValueError(f"invalid adapters: {error}") from None
        await self._change_live(lambda live: merged(live, change))
        return await self._adapters_loaded(model, wait_s)

    async def add_adapter(self, model: str, name: str, source: str | None = None,
                          wait_s: float = 60.0) -> dict[str, Any]:
        """Add one LoRA adapter to `model` (see set_adapters)."""
        path = AdapterConfig(name=name, source=source).path
        await self._change_live(lambda live: _with_adapters(live, model, {**live.adapters.get(model, {}), name: path}))
        return await self._adapters_loaded(model, wait_s)

    async def remove_adapter(self, name: str) -> dict[str, Any]:
        """Remove one LoRA adapter, whichever model it is of (see set_adapters)."""
        model = next((m for m, listed in self.live.adapters.items() if name in listed), None)
        if model is None:
            raise ValueError(f"no adapter named {name!r}")
        await self._change_live(lambda live: _with_adapters(
            live, model, {n: p for n, p in live.adapters.get(model, {}).items() if n != name}))
        return await self._adapters_loaded(model, 0)

    async def traffic(self) -> dict[str, dict[str, float]]:
        """The weights in force on this replica."""
        return {name: split.weights for name, split in self.serving.traffic.splits.items()}

    async def live_settings(self) -> dict[str, Any]:
        """The traffic splits and adapters in force on this replica."""
        return self.live.model_dump(mode="json")

    async def _change_live(self, edit: Callable[[LiveState], LiveState]) -> None:
        """A handle change, made on top of the settings in force everywhere: if another replica changed
        them first, take its change and make this one again on top of it."""
        for _ in range(5):
            version, state = self.sync.live_version, edit(self.live)
            try:
                applied(self.start_config, state)
            except ConfigError as error:
                raise ValueError(str(error)) from None
            if await self.sync.put_live(state.model_dump(mode="json"), version):
                self._apply_live(state)
                return
            await self._synced_past(version)
        raise RuntimeError("the live settings kept changing under this call (five other changes at once); "
                           "make it again")

    async def _synced_past(self, version: int, timeout_s: float = 5.0) -> None:
        """Wait for this replica's sync to bring a live settings version other than `version`."""
        self._ensure_syncing()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sync.live_past(version), timeout_s)

    async def _adapters_loaded(self, model: str, wait_s: float) -> dict[str, Any]:
        wanted = set(self.live.adapters.get(model, {}))
        deadline = time.monotonic() + wait_s
        while True:
            replicas = [r for r in self.cluster.replicas.values() if r.info.model == model]
            serving = {name: sum(1 for r in replicas if r.stats.adapters is not None and name in
                                 (r.stats.adapters.served or ())) for name in sorted(wanted)}
            if all(count == len(replicas) for count in serving.values()) or time.monotonic() >= deadline:
                return {"replicas": len(replicas), "serving": serving}
            await asyncio.sleep(0.1)

    def _apply_live(self, state: LiveState) -> None:
        config = applied(self.start_config, state)
        self.serving.set_served(self._served_models(config), config.traffic)
        self.live = state

    def _live_changed(self, live: dict[str, Any]) -> None:
        try:
            self._apply_live(LiveState.model_validate(live))
        except (ValidationError, ConfigError, ValueError) as error:  # checked by the replica that set it
            self._live_error("live settings from another replica", error)

    def _live_error(self, source: str, error: Exception) -> None:
        self.metrics.live_config_errors.inc()
        logger.error("%s not applied; what was in force keeps serving:\n%s", source, error)

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's /tokenize: a `prompt` or chat `messages` as the model's token ids."""
        return (await self.serving.preparer.tokenize(body)).model_dump()

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.serving.preparer.detokenize(body).model_dump()

    async def _stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with contextlib.aclosing(self.serving.stream(endpoint, body)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def __del__(self) -> None:
        if getattr(self, "listener", None) is not None:
            await self.listener.stop()
        for pool in getattr(self, "_pools", {}).values():
            pool.close()
