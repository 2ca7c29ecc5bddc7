"""Every model's engine client, built in one place: routed over one role's replicas, split into prefill and
decode, or unranked (a transport that picks, for the baselines that rank inside Serve's handle).

The deployment layer says what a model has (`ModelPlan`) and how replicas are reached (transports by
role, and HTTP where this process can reach an engine's server); this decides the chain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from app.gateway.client import EngineClient, Transport
from app.gateway.metrics import DisaggregationMetrics, RouterMetrics
from app.gateway.relay import EngineReply, ForwardedCall
from app.gateway.routed import RoutedClient, reachable_from
from app.gateway.split import SplitClient
from app.protocol.engine import EngineRequest
from app.router.scheduler import Scheduler
from app.router.state import ReplicaRole, ReplicaState


@dataclass(frozen=True, slots=True)
class SplitPlan:
    min_split_tokens: int
    prefill_timeout_s: float


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """What the client of one model needs to know about it."""

    name: str
    block_size: int
    max_ongoing: Mapping[str, int | None] = field(default_factory=dict)
    """By role, the most of this router's requests one replica carries (None: no limit)."""
    max_queued: Mapping[str, int | None] = field(default_factory=dict)
    """By role, requests that may wait at the gateway when every replica is full (None: no limit); a
    client over several roles takes the largest."""
    max_attempts: int = 3
    avoid_failed_for_s: float = 3.0
    split: SplitPlan | None = None
    """Prefill/decode disaggregation; None: every replica serves whole requests."""


@dataclass(frozen=True, slots=True)
class Reach:
    """How this process reaches a model's replicas."""

    by_role: Mapping[str, Transport] = field(default_factory=dict)
    """Transports that reach any replica of a role (through the deployment, e.g. a Serve handle)."""
    http: Transport | None = None
    """Straight to an engine's own server, where `reachable_from` says this node can."""
    node_id: str | None = None


class UnrankedClient:
    """A model whose replica the transport picks (the baselines that rank inside Serve's handle)."""

    def __init__(self, transport: Transport, *, model: str, streams: Counter | None = None) -> None:
        self._transport = transport
        self._model = model
        self._streams = streams

    async def open(self, request: EngineRequest, call: ForwardedCall) -> EngineReply:
        if self._streams is not None:
            self._streams.labels(self._model, self._transport.path).inc()
        return await self._transport.open(request, call, None, [])


class ClientBuilder:
    """Builds engine clients that share one scheduler, its metrics and its bookkeeping hooks."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        router_metrics: RouterMetrics | None = None,
        split_metrics: DisaggregationMetrics | None = None,
        streams: Counter | None = None,
        speculate: Callable[[str, list[int]], None] | None = None,
        on_request: Callable[[], None] = lambda: None,
        ranks_requests: bool = True,
    ) -> None:
        """`ranks_requests` False: unsplit models go to a transport that picks (Serve's own router)."""
        self._scheduler = scheduler
        self._router_metrics = router_metrics
        self._split_metrics = split_metrics or DisaggregationMetrics(CollectorRegistry())
        self._streams = streams
        self._speculate = speculate
        self._on_request = on_request
        self._ranks_requests = ranks_requests

    def build(self, plan: ModelPlan, reach: Reach) -> EngineClient:
        if plan.split is None and not self._ranks_requests and "mixed" in reach.by_role:
            return UnrankedClient(reach.by_role["mixed"], model=plan.name, streams=self._streams)
        if plan.split is None:
            return self.routed(plan, reach, ("mixed",))
        # The split needs the gateway's own scheduler whatever the policy: it picks decode first.
        return SplitClient(
            self.routed(plan, reach, ("decode", "mixed")),
            # A failed prefill is not retried: the decode replica computing the prompt is faster.
            self.routed(plan, reach, ("prefill",), max_attempts=1),
            model=plan.name,
            min_split_tokens=plan.split.min_split_tokens,
            prefill_timeout_s=plan.split.prefill_timeout_s,
            metrics=self._split_metrics,
        )

    def routed(
        self, plan: ModelPlan, reach: Reach, roles: tuple[ReplicaRole, ...], *, max_attempts: int | None = None
    ) -> RoutedClient:
        http, by_role, node_id = reach.http, reach.by_role, reach.node_id

        def transport_for(replica: ReplicaState) -> Transport | None:
            if http is not None and reachable_from(replica, node_id):
                return http
            return by_role.get(replica.info.role)

        return RoutedClient(
            model=plan.name, block_size=plan.block_size, scheduler=self._scheduler,
            transport_for=transport_for, fallback=next((by_role[r] for r in roles if r in by_role), None),
            roles=roles, max_attempts=max_attempts or plan.max_attempts, avoid_failed_for_s=plan.avoid_failed_for_s,
            metrics=self._router_metrics, streams=self._streams, speculate=self._speculate,
            on_request=self._on_request,
            max_ongoing={role: limit for role, limit in plan.max_ongoing.items() if role in roles},
            max_queued=_largest([plan.max_queued[role] for role in roles if role in plan.max_queued]),
        )


def _largest(limits: list[int | None]) -> int | None:
    return None if not limits or None in limits else max(limits)  # type: ignore[type-var]
