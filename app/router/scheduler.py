"""Which replica serves a request: the routing profile's plugins run over the whole fleet at once.

Filters narrow the candidates (a mask each, in order), scorers price each replica (summed with their
weights), and the picker ranks every candidate, deterministically. Built-in policies are profiles
(app/router/config.py): `prefix_aware` (ours, the default) predicts each replica's TTFT from its
queue and the prompt tokens it would have to prefill, calibrated online, with a guard so cache
affinity can never pile load onto one replica; `round_robin` and `power_of_two` are the load-only
baselines. (Ray's own PrefixCacheAffinityRouter is the third baseline; it runs inside Serve's handle,
see app/deployments/serve_request_router.py, and the benchmarks drive it in virtual time.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app.router.config import POLICIES, Policy, RoutingConfig, RoutingProfile
from app.router.cost import TTFTFeatures, TTFTModel
from app.router.fleet import Fleet, FleetView, RoutingRequest
from app.router.plugins import registry
from app.router.plugins.base import Filter, FilterResult, Picker, PluginContext, Scorer
from app.router.state import ClusterState, ReplicaRole, ReplicaState

__all__ = ["POLICIES", "REASONS", "Decision", "Policy", "RoutingConfig", "RoutingRequest", "Scheduler"]

Reason = Literal["prefix", "load", "no_prefix", "guard", "stale_state", "all_saturated", "baseline",
                 "adapter_loading"]
REASONS: tuple[str, ...] = ("prefix", "load", "no_prefix", "guard", "stale_state", "all_saturated", "baseline",
                            "adapter_loading")


@dataclass(slots=True)
class Decision:
    ranked: list[str]
    reason: str
    policy: str
    matched_tokens: int = 0
    """Prompt tokens the chosen replica is believed to hold."""
    uncached_tokens: int = 0
    predicted_ttft_s: float | None = None
    features: TTFTFeatures | None = None
    matched_by_replica: dict[str, int] = field(default_factory=dict)

    @property
    def replica_id(self) -> str:
        return self.ranked[0]


class Pipeline:
    """A routing profile's plugins, built."""

    def __init__(self, profile: RoutingProfile, context: PluginContext) -> None:
        def build(kind: str, spec):  # type: ignore[no-untyped-def]
            plugin = registry.KINDS[kind][spec.type]
            return plugin(plugin.Params.model_validate(spec.parameters), context)

        self.name = profile.name
        self.filters: list[Filter] = [build("filter", spec) for spec in profile.filters]
        self.scorers: list[tuple[float, Scorer]] = [(spec.weight, build("scorer", spec)) for spec in profile.scorers]
        self.picker: Picker = build("picker", profile.picker)

    def run_filters(self, view: FleetView) -> list[FilterResult]:
        """Each filter's mask, given what the earlier ones left; one that would leave nobody is set aside."""
        results = []
        passed = view.fleet.everyone
        for plugin in self.filters:
            mask = plugin.mask(view, passed)
            kept = passed & mask
            bypassed = not kept.any()
            if bypassed:
                mask, kept = view.fleet.everyone, passed
            results.append(FilterResult(mask=mask, kept=kept, filter=plugin, bypassed=bypassed))
            passed = kept
        return results

    def cost(self, view: FleetView) -> np.ndarray | None:
        total: np.ndarray | None = None
        for weight, scorer in self.scorers:
            cost = scorer.cost(view)
            weighted = cost if weight == 1.0 else cost * weight
            total = weighted if total is None else total + weighted
        return total


class Scheduler:
    def __init__(self, state: ClusterState, config: RoutingConfig | None = None) -> None:
        self.state = state
        self.config = config or RoutingConfig()
        self.ttft_model = TTFTModel(self.config.ttft_prior)
        self.pipeline = Pipeline(
            self.config.effective_profile(), PluginContext(self.ttft_model, random.Random(self.config.seed))
        )
        self._avg_uncached_tokens = 512.0
        self._fleets: dict[tuple[str, tuple[ReplicaRole, ...]], Fleet] = {}

    def schedule(self, request: RoutingRequest, now: float) -> Decision | None:
        """Rank the model's replicas for this request; None when none are known."""
        fleet = self._fleet(request.model, request.roles)
        if not fleet.states:
            return None
        fresh = self.state.is_fresh(now)
        blocks = self._prefix_blocks(fleet, request, now) if fresh else np.zeros(len(fleet.ids), dtype=np.int64)
        view = FleetView(request, fleet, blocks, fresh=fresh, avg_uncached_tokens=self._avg_uncached_tokens,
                         now=now)
        pipeline = self.pipeline
        ranking = pipeline.picker.rank(view, pipeline.run_filters(view), pipeline.cost(view))
        order = ranking.order
        if request.adapter is not None:
            # Not a filter that may be set aside: an engine that does not serve the adapter refuses it.
            order = [i for i in order if _serves(fleet.states[i], request.adapter)]
            if not order:
                return Decision(ranked=[], reason="adapter_loading", policy=pipeline.name)
        best = order[0]
        decision = Decision(ranked=[fleet.ids[i] for i in order], reason=ranking.reason, policy=pipeline.name)
        if view.predicted_ttft is not None and view.ttft_inputs is not None:
            prefill, load, queued = view.ttft_inputs
            decision.predicted_ttft_s = float(view.predicted_ttft[best])
            decision.features = TTFTFeatures(
                prefill_tokens=float(prefill[best]), load=float(load[best]), queued=float(queued[best])
            )
        if request.adapter is not None:
            fleet.states[best].sent_adapters[request.adapter] = now
        decision.matched_by_replica = {fleet.ids[i]: int(blocks[i]) for i in np.flatnonzero(blocks)}
        matched = self._matched_tokens(request, decision.matched_by_replica.get(decision.replica_id, 0))
        decision.matched_tokens = matched
        decision.uncached_tokens = request.num_prompt_tokens - matched
        self._avg_uncached_tokens += 0.05 * (decision.uncached_tokens - self._avg_uncached_tokens)
        return decision

    def adapter_served(self, request: RoutingRequest) -> bool:
        """Whether some replica of the request's model serves its adapter (a cheap check before ranking)."""
        fleet = self._fleet(request.model, request.roles)
        return request.adapter is None or any(_serves(state, request.adapter) for state in fleet.states)

    def observe_ttft(self, decision: Decision, ttft_s: float) -> None:
        if decision.features is not None:
            self.ttft_model.observe(decision.features, ttft_s)

    def _fleet(self, model: str, roles: tuple[ReplicaRole, ...]) -> Fleet:
        key = (model, roles)
        fleet = self._fleets.get(key)
        if fleet is None or fleet.version != self.state.membership_version:
            fleet = Fleet.of(self.state.candidates(model, roles), self.state.index.bit_of,
                             self.state.membership_version)
            self._fleets[key] = fleet
        return fleet

    def _prefix_blocks(self, fleet: Fleet, request: RoutingRequest, now: float) -> np.ndarray:
        """Leading prompt blocks each candidate holds (0 where its block size differs from the request's)."""
        counts = self.state.prefix_blocks_by_bit(request.block_hashes, now)
        if counts is None:
            return np.zeros(len(fleet.ids), dtype=np.int64)
        blocks = counts[fleet.bits].astype(np.int64)
        blocks[fleet.block_sizes != request.block_size] = 0
        return blocks

    @staticmethod
    def _matched_tokens(request: RoutingRequest, blocks: int) -> int:
        # vLLM always recomputes the last prompt token, so a fully cached prompt still prefills one.
        return min(blocks * request.block_size, max(request.num_prompt_tokens - 1, 0))

    # -- the request's life, as the caller reports it --------------------------------------------

    def on_dispatch(self, decision: Decision, request: RoutingRequest, replica_id: str, now: float) -> None:
        """The request went to `replica_id` (normally decision.ranked[0])."""
        self.state.note_routed(replica_id, request.block_hashes, now)
        self.state.on_dispatch(replica_id, self._uncached_on(decision, request, replica_id))

    def on_first_token(
        self, decision: Decision, request: RoutingRequest, replica_id: str, ttft_s: float, *, learn: bool = True
    ) -> None:
        """`learn=False` when the TTFT is not the cost model's to explain (a decode that pulled its KV cache)."""
        self.state.on_first_token(replica_id, self._uncached_on(decision, request, replica_id))
        if learn and replica_id == decision.replica_id:
            self.observe_ttft(decision, ttft_s)

    def on_finish(
        self, decision: Decision, request: RoutingRequest, replica_id: str, got_first_token: bool
    ) -> None:
        self.state.on_finish(replica_id, self._uncached_on(decision, request, replica_id), got_first_token)

    def _uncached_on(self, decision: Decision, request: RoutingRequest, replica_id: str) -> int:
        if replica_id == decision.replica_id:
            return decision.uncached_tokens
        return request.num_prompt_tokens - self._matched_tokens(
            request, decision.matched_by_replica.get(replica_id, 0)
        )


def _serves(replica: ReplicaState, adapter: str) -> bool:
    """Whether the replica serves the adapter, as far as it says (a server that does not say: assume so)."""
    adapters = replica.stats.adapters
    if adapters is None or adapters.served is None:
        return not replica.info.lists_adapters  # a replica that will say has not said yet
    return adapter in adapters.served
