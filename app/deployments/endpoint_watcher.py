"""The endpoint watcher: makes each external server a replica to the router.

One small deployment per externally served model (`endpoints-<model>`, one replica). For each
server it reads /metrics on a short interval (load, health, restarts), subscribes to the server's
KV events when it publishes them, and registers and reports the server to the cluster-state actor
as an engine replica reports itself; one loop scrapes every server and sends what changed for all
of them in one actor call per round. Ingress replicas then rank the servers with the same scheduler
as Ray-managed engines and stream from them directly; no request passes through here.

- A server that stops answering for `down_after_s` is unregistered: it leaves the candidate set.
- When it answers again it is registered afresh with an empty cache, because it may have restarted;
  a restart without an outage is caught by its counters going back or its event numbering starting over.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from app.config import ClusterStateConfig, ModelConfig
from app.deployments.state_sync import BatchReporter, EngineReporter
from app.engines.external.config import ExternalEndpoint, ExternalEngineConfig
from app.engines.external.dialects import MISSING
from app.engines.external.kubernetes import KubernetesPodDiscovery
from app.engines.external.monitor import EndpointMonitor
from app.engines.vllm.kv_events import KVEventSubscriber
from app.protocol.engine import CacheConfig
from app.router.state import ReplicaInfo, ReplicaStats
from app.upstream import UpstreamPool

logger = logging.getLogger("ray.serve")

_FIRST_LIST_WAIT_S = 15.0

_DEFAULT_NUM_BLOCKS = 65_536
"""Capacity assumed for a server whose /metrics does not say (it bounds the router's index only)."""


class _NoEvents:
    """The event source of a server that does not publish: the router guesses from what it sent."""

    def take_kv_events(self) -> list[bytes]:
        return []

    def cached_block_hashes(self) -> list[int]:
        return []  # (re-)registering means the server's cache is new, or the actor lost it anyway


def external_replica_id(model: str, url: str) -> str:
    """The router's id for one model on one external server."""
    return f"{model}@{url}"


@dataclass
class EndpointStatus:
    url: str
    healthy: bool
    registered: bool
    generation: int
    kv_events: bool
    last_error: str | None
    missed_event_batches: int


class WatchedEndpoint:
    """One server: its monitor, its event subscriber (if any), and its registration."""

    def __init__(
        self,
        endpoint: ExternalEndpoint,
        engine: ExternalEngineConfig,
        *,
        app_name: str,
        model: str,
        http: UpstreamPool,
        cluster_state: ClusterStateConfig,
        node_id: str | None,
        use_kv_events: bool = True,
    ) -> None:
        self.endpoint = endpoint
        self.url = endpoint.url
        # One server may serve several of the gateway's models (names, adapters): one replica per model.
        self.replica_id = external_replica_id(model, endpoint.url)
        self._engine = engine
        self._model = model
        self._node_id = node_id
        declared = CacheConfig(block_size=engine.block_size, num_gpu_blocks=engine.num_blocks or _DEFAULT_NUM_BLOCKS,
                               prefix_caching_hash_algo=engine.hash_algo, hash_seed=engine.hash_seed,
                               enable_prefix_caching=engine.enable_prefix_caching)
        self.monitor = EndpointMonitor(
            endpoint.url, http, model=model, endpoint_id=endpoint.url, declared=declared, metrics=engine.metrics,
            health_path=engine.health_path, down_after_s=engine.down_after_s,
            timeout_s=max(engine.scrape_interval_s * 5, 1.0),
        )
        self._said_dialect: str | None = None
        # Events name blocks by the server's token hashes; without the tokenizer no request key ever matches.
        subscribe = endpoint.kv_events is not None and use_kv_events
        self.events = KVEventSubscriber(connect=endpoint.kv_events) if subscribe else None
        self.reporter = EngineReporter(app_name, self._info(), self.events or _NoEvents(), self._stats, cluster_state)
        self._seen_publisher_restarts = 0
        self._warned_geometry = False
        self._logged_down = False
        self.crash: BaseException | None = None
        """The error that broke this server's watch (a bug): the watcher reports itself unhealthy."""

    def _info(self) -> ReplicaInfo:
        stats = self.monitor.stats
        cache = stats.cache_config if stats is not None else None
        return ReplicaInfo(
            replica_id=self.replica_id,
            model=self._model,
            engine_id=f"{self.replica_id}#{self.monitor.generation}",
            block_size=self._engine.block_size,
            num_gpu_blocks=(cache.num_gpu_blocks if cache is not None and cache.num_gpu_blocks > 0
                            else _DEFAULT_NUM_BLOCKS),
            max_num_seqs=self._engine.max_num_seqs,
            hash_algo=self._engine.hash_algo,
            hash_seed=self._engine.hash_seed,
            kv_events=self.events is not None,
            endpoint_url=self.url,
            node_id=self._node_id,
            metrics_dialect=self.monitor.dialect or "none",
        )

    def _stats(self) -> ReplicaStats:
        stats = self.monitor.stats
        return stats.load() if stats is not None else ReplicaStats()

    def start(self) -> None:
        if self.events is not None:
            self.events.start()

    async def step(self) -> None:
        """One scrape, then register again or unregister as the server's state says (the watcher's
        loop sends the reports of every server together)."""
        result = await self.monitor.poll()
        if not self.monitor.healthy:
            if not result.ok and not self._logged_down:
                self._logged_down = True
                logger.warning("endpoint %s (model %s) is not answering: %s", self.url, self._model, result.error)
            if self.reporter.registered:
                logger.warning("endpoint %s left the routing candidates (no answer for %.1fs)",
                               self.url, self._engine.down_after_s)
                await self._unregister()
            return
        if self._logged_down:
            self._logged_down = False
            logger.info("endpoint %s (model %s) is answering again", self.url, self._model)
        self._say_dialect()
        self._check_geometry()
        restarts = self.events.publisher_restarts if self.events is not None else 0
        if result.restarted or restarts != self._seen_publisher_restarts:
            if result.restarted and restarts == self._seen_publisher_restarts and self.events is not None:
                self.events.clear()  # restarted before publishing anything: what we mirrored is gone
            self._seen_publisher_restarts = restarts
            logger.info("endpoint %s restarted (generation %d): dropping its cache entries",
                        self.url, self.monitor.generation)
            self.reporter.reregister(self._info())
        elif not self.reporter.registered:
            self.reporter.reregister(self._info())  # first contact, or back from the candidates' edge

    def _say_dialect(self) -> None:
        dialect = self.monitor.dialect
        if dialect is None or dialect == self._said_dialect:
            return
        first = self._said_dialect is None
        self._said_dialect = dialect
        if MISSING[dialect]:
            logger.warning("endpoint %s (model %s) has %s metrics; the router lacks its %s", self.url, self._model,
                           "no readable" if dialect == "none" else f"{dialect}'s", MISSING[dialect])
        if not first:
            self.reporter.reregister(self._info())  # the new dialect reaches the routers' metrics

    @property
    def reporting(self) -> bool:
        """Whether this server is a routing candidate the actor should hear about."""
        return self.monitor.healthy and self.crash is None

    def _check_geometry(self) -> None:
        stats = self.monitor.stats
        if stats is None or self._warned_geometry:
            return
        cache, engine = stats.cache_config, self._engine
        mismatches = [
            f"{name} {theirs} (config says {ours})"
            for name, theirs, ours in (
                ("block_size", cache.block_size, engine.block_size),
                ("prefix_caching_hash_algo", cache.prefix_caching_hash_algo, engine.hash_algo),
            )
            if theirs and str(theirs) != str(ours)
        ]
        if mismatches:
            self._warned_geometry = True
            logger.warning("endpoint %s reports %s: the router's block keys will not match the server's cache; "
                           "fix engine.block_size / engine.hash_algo of model %s", self.url,
                           ", ".join(mismatches), self._model)

    async def _unregister(self) -> None:
        await self.reporter.unregister()
        self.reporter.reregister()  # registered again (as new) once it answers

    def status(self) -> EndpointStatus:
        return EndpointStatus(
            url=self.url,
            healthy=self.monitor.healthy,
            registered=self.reporter.registered,
            generation=self.monitor.generation,
            kv_events=self.events is not None,
            last_error=self.monitor.last_error,
            missed_event_batches=self.events.missed_batches if self.events is not None else 0,
        )

    async def close(self, *, unregister: bool = True) -> None:
        if self.events is not None:
            await self.events.close()
        if unregister:
            await self.reporter.unregister()


@serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1, max_ongoing_requests=16)
class EndpointWatcher:
    """Watches one model's external servers and keeps the router's view of them current."""

    async def __init__(self, model: dict[str, Any], cluster_state: dict[str, Any] | None = None) -> None:
        self.endpoints: dict[str, WatchedEndpoint] = {}
        config = ModelConfig.model_validate(model)
        assert isinstance(config.engine, ExternalEngineConfig)
        self._engine = config.engine
        self._model = config.name
        self._use_kv_events = config.tokenizer is not None
        publishing = self._engine.kubernetes is not None and self._engine.kubernetes.kv_events_port is not None
        if not self._use_kv_events and (publishing or any(e.kv_events for e in self._engine.endpoints)):
            logger.warning("model %s has no tokenizer configured, so the servers' KV events cannot be matched to "
                           "requests and are not subscribed to; set `tokenizer` to route on them", self._model)
        context = serve.get_replica_context()
        self._app_name = context.app_name if context else ""
        self._cluster_state = ClusterStateConfig.model_validate(cluster_state or {})
        self._node_id = ray.get_runtime_context().get_node_id()
        self._http = UpstreamPool(connect_timeout_s=max(self._engine.scrape_interval_s * 5, 1.0))
        self._reports = BatchReporter(self._app_name, self._cluster_state, f"watcher of model {self._model}")
        self._loop_task: asyncio.Task[None] | None = None
        self._discovery: KubernetesPodDiscovery | None = None
        self._discovery_task: asyncio.Task[None] | None = None
        if self._engine.kubernetes is not None:
            # Pods come and go: the watch hands over the whole ready set at every change.
            listed = asyncio.Event()

            async def on_change(endpoints: list[ExternalEndpoint]) -> None:
                await self.set_endpoints(endpoints)
                listed.set()

            self._discovery = KubernetesPodDiscovery(self._engine.kubernetes, on_change)
            self._discovery_task = asyncio.get_running_loop().create_task(self._discovery.run())
            # Like a fixed list, the first set is in place before the gateway reports ready; an API
            # server that cannot be reached yet delays that by at most this, and is retried after.
            try:
                await asyncio.wait_for(listed.wait(), timeout=_FIRST_LIST_WAIT_S)
            except TimeoutError:
                logger.warning("model %s: Kubernetes discovery has not listed pods after %.0fs (%s); starting "
                               "without servers, still trying", self._model, _FIRST_LIST_WAIT_S,
                               self._discovery.last_error)
        else:
            await self.set_endpoints(self._engine.endpoints)
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Scrape every server, then tell the actor what changed, all of them in one call."""
        while True:
            await asyncio.sleep(self._engine.scrape_interval_s)
            watched = list(self.endpoints.values())
            await self._step(watched)
            await self._reports.report([w.reporter for w in watched if w.reporting and w.url in self.endpoints])

    @staticmethod
    async def _step(watched: list[WatchedEndpoint]) -> None:
        live = [w for w in watched if w.crash is None]
        results = await asyncio.gather(*(w.step() for w in live), return_exceptions=True)
        for w, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                w.crash = result
                logger.error("the watch of endpoint %s stopped: %r", w.url, result)

    async def set_endpoints(self, endpoints: list[ExternalEndpoint]) -> None:
        """Watch exactly these servers: new ones are scraped once before they are registered."""
        wanted = {endpoint.url: endpoint for endpoint in endpoints}
        for url in [url for url in self.endpoints if url not in wanted or wanted[url] != self.endpoints[url].endpoint]:
            logger.info("endpoint %s (model %s) removed", url, self._model)
            await self.endpoints.pop(url).close()
        added = [
            WatchedEndpoint(endpoint, self._engine, app_name=self._app_name, model=self._model, http=self._http,
                            cluster_state=self._cluster_state, node_id=self._node_id,
                            use_kv_events=self._use_kv_events)
            for url, endpoint in wanted.items() if url not in self.endpoints
        ]
        # The first scrape and report happen before this returns, so a gateway that reports ready can route.
        await self._step(added)
        await self._reports.report([watched.reporter for watched in added if watched.reporting])
        for watched in added:
            logger.info("endpoint %s (model %s) added: %s", watched.url, self._model,
                        "answering" if watched.monitor.healthy else f"not answering ({watched.monitor.last_error})")
            self.endpoints[watched.url] = watched
            watched.start()

    async def discovery_status(self) -> dict[str, Any] | None:
        """Kubernetes discovery's state (None with a fixed list): lists done, the last error."""
        if self._discovery is None:
            return None
        return {"lists": self._discovery.lists, "last_error": self._discovery.last_error,
                "endpoints": sorted(self.endpoints)}

    async def status(self) -> list[dict[str, Any]]:
        """Each server's state, for operators and tests."""
        return [vars(watched.status()) for watched in self.endpoints.values()]

    async def check_health(self) -> None:
        task = self._discovery_task
        if task is not None and task.done() and not task.cancelled():
            raise RuntimeError(f"Kubernetes discovery stopped: {task.exception()!r}")
        loop = self._loop_task
        if loop is not None and loop.done() and not loop.cancelled():
            raise RuntimeError(f"the watch loop stopped: {loop.exception()!r}")
        for watched in self.endpoints.values():
            if watched.crash is not None:
                raise RuntimeError(f"the watch of endpoint {watched.url} stopped: {watched.crash!r}")

    async def __del__(self) -> None:
        for name in ("_discovery_task", "_loop_task"):
            task = getattr(self, name, None)
            if task is not None:
                task.cancel()
        for watched in list(self.endpoints.values()):
            await watched.close()
        if hasattr(self, "_http"):  # not when __init__ failed before making it
            self._http.close()
