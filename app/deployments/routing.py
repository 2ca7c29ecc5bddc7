"""The scheduler on the request path: rank engine replicas, send, and learn from the outcome.

`RoutedEngineClient` wraps the Serve engine client. Per request it asks the local scheduler for a
ranking (local memory only, no remote call), puts it on the engine request for the Serve request
router, records the dispatch (in-flight counts, speculative prefix entries shared through the state
actor), and on the first output feeds the observed TTFT back into the cost model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.api.serving import EngineClient
from app.deployments.cluster_sync import RouterStateSync
from app.engines.protocol import EngineOutput, EngineRequest
from app.router.scheduler import Decision, RoutingRequest, Scheduler
from app.router.state import ReplicaRole

_DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.decision_seconds = Histogram(
            "gateway_routing_decision_seconds", "Time to rank the replicas for one request.",
            ["model"], buckets=_DECISION_BUCKETS, registry=r,
        )
        self.decisions = Counter(
            "gateway_routing_decisions", "Routing decisions by policy and reason.", ["model", "policy", "reason"],
            registry=r,
        )
        self.predicted_ttft = Histogram(
            "gateway_routing_predicted_ttft_seconds", "TTFT the cost model predicted for the chosen replica.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.observed_ttft = Histogram(
            "gateway_routing_observed_ttft_seconds", "TTFT observed from dispatch to the first output.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.ttft_error = Histogram(
            "gateway_routing_ttft_prediction_error_seconds", "|observed - predicted| TTFT.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.routed_prompt_tokens = Counter(
            "gateway_routing_prompt_tokens", "Prompt tokens of routed requests.", ["model"], registry=r
        )
        self.estimated_hit_tokens = Counter(
            "gateway_routing_estimated_prefix_hit_tokens",
            "Prompt tokens the router expected the chosen replica to have cached.", ["model"], registry=r,
        )
        self.engine_hit_tokens = Counter(
            "gateway_routing_engine_prefix_hit_tokens",
            "Prompt tokens the engine reported served from its prefix cache.", ["model"], registry=r,
        )
        self.replica_load = Gauge(
            "gateway_replica_load", "Per engine replica: in-flight (this router), running, waiting, KV usage.",
            ["model", "replica", "signal"], registry=r,
        )
        self.prefix_keys = Gauge(
            "gateway_routing_prefix_keys",
            "1 for the kind of prefix keys a model is routed on: exact (the engines' block hashes, from the "
            "model's tokenizer) or approximate (text blocks, when the gateway has no tokenizer for it).",
            ["model", "kind"], registry=r,
        )
        self.state_age = Gauge(
            "gateway_cluster_state_age_seconds", "Time since this router last synced with the state actor.",
            registry=r,
        )


class RoutedEngineClient:
    """Ranks one model's replicas of some roles and streams each request from the chosen one.

    `clients` maps each role to the engine client of that role's deployment; a request goes through
    the client of its chosen replica's role, with the full ranking for Serve to fall back on.
    """

    def __init__(
        self,
        clients: Mapping[ReplicaRole, EngineClient],
        *,
        model: str,
        block_size: int,
        scheduler: Scheduler,
        sync: RouterStateSync | None,
        metrics: RouterMetrics,
        roles: tuple[ReplicaRole, ...] = ("mixed",),
        on_request: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_request = on_request
        self._clients = dict(clients)
        self._model = model
        self._block_size = block_size
        self._scheduler = scheduler
        self._sync = sync
        self._metrics = metrics
        self.roles = roles

    def role_of(self, replica_id: str) -> ReplicaRole | None:
        replica = self._scheduler.state.replicas.get(replica_id)
        return replica.info.role if replica is not None else None

    def _client_for(self, replica_id: str | None) -> EngineClient:
        role = self.role_of(replica_id) if replica_id is not None else None
        if role in self._clients:
            return self._clients[role]
        return next(self._clients[r] for r in self.roles if r in self._clients)

    def route(self, request: EngineRequest) -> tuple[RoutingRequest, Decision | None]:
        """The scheduler's ranking for a request (None while no replica has registered)."""
        self._on_request()
        routing = RoutingRequest(
            model=self._model,
            block_hashes=request.block_hashes,
            num_prompt_tokens=request.num_prompt_tokens,
            block_size=self._block_size,
            roles=self.roles,
        )
        started = time.perf_counter()
        decision = self._scheduler.schedule(routing, time.monotonic())
        self._metrics.decision_seconds.labels(self._model).observe(time.perf_counter() - started)
        if decision is None:
            self._metrics.decisions.labels(self._model, self._scheduler.config.policy, "no_state").inc()
        else:
            self._record_decision(decision, routing)
        return routing, decision

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        routing, decision = self.route(request)
        async with contextlib.aclosing(self.serve(request, routing, decision)) as outputs:
            async for output in outputs:
                yield output

    async def serve(
        self, request: EngineRequest, routing: RoutingRequest, decision: Decision | None, *, learn: bool = True
    ) -> AsyncIterator[EngineOutput]:
        """Stream a routed request, keeping the scheduler's books (load, speculative entries, TTFT)."""
        if decision is None:
            # No replica registered yet (startup, or the state actor lost): Serve's own choice.
            async with contextlib.aclosing(self._client_for(None).generate(request)) as outputs:
                async for output in outputs:
                    yield output
            return
        request = request.model_copy(update={"route": decision.ranked})
        replica = decision.replica_id
        now = time.monotonic()
        self._dispatched(decision, routing, replica, now)
        first = True
        try:
            async with contextlib.aclosing(self._client_for(replica).generate(request)) as outputs:
                async for output in outputs:
                    if first:
                        first = False
                        replica = self._first_output(decision, routing, replica, output, now, learn)
                    if output.finished:
                        # Real vLLM reports cached prompt tokens only with the final usage.
                        self._metrics.engine_hit_tokens.labels(self._model).inc(output.num_cached_tokens)
                    yield output
        finally:
            self._scheduler.on_finish(decision, routing, replica, got_first_token=not first)

    def _record_decision(self, decision: Decision, routing: RoutingRequest) -> None:
        m, model = self._metrics, self._model
        m.decisions.labels(model, decision.policy, decision.reason).inc()
        m.routed_prompt_tokens.labels(model).inc(routing.num_prompt_tokens)
        m.estimated_hit_tokens.labels(model).inc(decision.matched_tokens)
        if decision.predicted_ttft_s is not None:
            m.predicted_ttft.labels(model).observe(decision.predicted_ttft_s)

    def _dispatched(self, decision: Decision, routing: RoutingRequest, replica: str, now: float) -> None:
        self._scheduler.on_dispatch(decision, routing, replica, now)
        if self._sync is not None:
            self._sync.speculated(replica, list(routing.block_hashes))

    def _first_output(
        self, decision: Decision, routing: RoutingRequest, replica: str, output: EngineOutput, dispatched: float,
        learn: bool,
    ) -> str:
        ttft = time.monotonic() - dispatched
        actual = output.replica_id or replica
        if actual != replica:
            # Serve fell back to another replica (the first choice was full): move the bookkeeping.
            self._scheduler.on_finish(decision, routing, replica, got_first_token=False)
            self._dispatched(decision, routing, actual, dispatched)
        self._scheduler.on_first_token(decision, routing, actual, ttft, learn=learn)
        m, model = self._metrics, self._model
        m.observed_ttft.labels(model).observe(ttft)
        if learn and decision.predicted_ttft_s is not None and actual == decision.replica_id:
            m.ttft_error.labels(model).observe(abs(ttft - decision.predicted_ttft_s))
        return actual
