"""Which replica serves a request: filters, then a policy that ranks the survivors.

Policies:
- `prefix_aware` (ours, the default): predict each replica's TTFT from its queue and the prompt
  tokens it would have to prefill (the ones it does not already hold), calibrated online; take the
  lowest, with a guard so cache affinity can never pile load onto one replica.
- `round_robin` and `power_of_two`: the load-only baselines.
(Ray's own PrefixCacheAffinityRouter is the third baseline; it runs inside Serve's handle, see
app/deployments/request_router.py, and the benchmarks drive it in virtual time.)

The ranking is total and deterministic: ties (within `tie_quantum_s` of predicted TTFT) are broken by
rendezvous hashing of the prompt's last block with each replica id, so two ingress replicas with the
same state pick the same replica, and an idle fleet still spreads distinct prompts evenly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import xxhash
from pydantic import BaseModel, ConfigDict, Field

from app.router.cost import TTFTFeatures, TTFTModel, TTFTPrior
from app.router.state import ClusterState, ReplicaRole, ReplicaState

Policy = Literal["prefix_aware", "round_robin", "power_of_two", "ray_prefix_cache_affinity"]
POLICIES: tuple[str, ...] = ("prefix_aware", "round_robin", "power_of_two", "ray_prefix_cache_affinity")

Reason = Literal["prefix", "load", "no_prefix", "guard", "stale_state", "all_saturated", "baseline"]
REASONS: tuple[str, ...] = ("prefix", "load", "no_prefix", "guard", "stale_state", "all_saturated", "baseline")


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Policy = Field(default="prefix_aware", description="Replica choice for each request.")
    guard_load_ratio: float = Field(
        default=2.0, ge=1.0, description="A replica may carry at most this multiple of the least-loaded one's load..."
    )
    guard_load_slack: int = Field(default=8, ge=0, description="...plus this many requests.")
    saturated_kv_usage: float = Field(
        default=0.98, gt=0, le=1, description="KV usage at which a replica with a queue counts as saturated."
    )
    affinity_weight: float = Field(
        default=0.5,
        ge=0,
        description="Extra cost, as a fraction of their prefill time, for the prefix tokens a replica would "
        "have to duplicate from the best holder. Predicted TTFT alone is myopic: it would split a group "
        "across replicas as soon as the holder has one request queued, halving the cache.",
    )
    tie_quantum_s: float = Field(default=0.001, ge=0, description="Predicted TTFTs this close count as equal.")
    speculative_ttl_s: float = Field(default=5.0, gt=0, description="How long a routing-time guess stays.")
    stale_after_s: float = Field(default=2.0, gt=0, description="Cluster state older than this is ignored.")
    ttft_prior: TTFTPrior = Field(default_factory=TTFTPrior)
    seed: int = 0


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    model: str
    block_hashes: Sequence[int]
    num_prompt_tokens: int
    block_size: int
    roles: tuple[ReplicaRole, ...] = ("mixed",)


@dataclass(slots=True)
class Decision:
    ranked: list[str]
    reason: Reason
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


def _tiebreak(key: int, replica_id: str) -> int:
    return xxhash.xxh3_64_intdigest(replica_id.encode(), seed=key & 0xFFFFFFFFFFFFFFFF)


class Scheduler:
    def __init__(self, state: ClusterState, config: RoutingConfig | None = None) -> None:
        self.state = state
        self.config = config or RoutingConfig()
        self.ttft_model = TTFTModel(self.config.ttft_prior)
        self._rng = random.Random(self.config.seed)
        self._round_robin = 0
        self._avg_uncached_tokens = 512.0

    def schedule(self, request: RoutingRequest, now: float) -> Decision | None:
        """Rank the model's replicas for this request; None when none are known."""
        candidates = sorted(self.state.candidates(request.model, request.roles), key=lambda s: s.replica_id)
        if not candidates:
            return None
        fresh = self.state.is_fresh(now)
        matches = self.state.prefix_matches(request.block_hashes, now) if fresh else {}
        policy = self.config.policy
        if policy == "round_robin":
            decision = self._round_robin_rank(candidates)
        elif policy in ("power_of_two", "ray_prefix_cache_affinity"):
            decision = self._power_of_two_rank(candidates)
        else:
            decision = self._prefix_aware_rank(candidates, request, matches, fresh)
        decision.matched_by_replica = matches
        matched = self._matched_tokens(request, matches.get(decision.replica_id, 0))
        decision.matched_tokens = matched
        decision.uncached_tokens = request.num_prompt_tokens - matched
        self._avg_uncached_tokens += 0.05 * (decision.uncached_tokens - self._avg_uncached_tokens)
        return decision

    def observe_ttft(self, decision: Decision, ttft_s: float) -> None:
        if decision.features is not None:
            self.ttft_model.observe(decision.features, ttft_s)

    # -- policies ------------------------------------------------------------------------------

    def _round_robin_rank(self, candidates: list[ReplicaState]) -> Decision:
        start = self._round_robin % len(candidates)
        self._round_robin += 1
        ranked = [c.replica_id for c in candidates[start:] + candidates[:start]]
        return Decision(ranked=ranked, reason="baseline", policy="round_robin")

    def _power_of_two_rank(self, candidates: list[ReplicaState]) -> Decision:
        picks = self._rng.sample(candidates, min(2, len(candidates)))
        picks.sort(key=lambda c: c.load)
        rest = sorted((c for c in candidates if c not in picks), key=lambda c: (c.load, c.replica_id))
        return Decision(ranked=[c.replica_id for c in picks + rest], reason="baseline", policy="power_of_two")

    def _prefix_aware_rank(
        self, candidates: list[ReplicaState], request: RoutingRequest, matches: dict[str, int], fresh: bool
    ) -> Decision:
        cfg = self.config
        n = len(candidates)
        prompt = request.num_prompt_tokens
        matched = np.array(
            [
                self._matched_tokens(request, matches.get(c.replica_id, 0))
                if c.info.block_size == request.block_size
                else 0
                for c in candidates
            ],
            dtype=np.float64,
        )
        load = np.array([c.load for c in candidates], dtype=np.float64)
        ahead = np.array(
            [
                max(c.pending_prefill_tokens, c.stats.num_requests_waiting * self._avg_uncached_tokens)
                for c in candidates
            ],
            dtype=np.float64,
        )
        uncached = prompt - matched
        prefill = ahead + uncached
        ttft = self.ttft_model.predict_many(prefill, load)
        duplicated = matched.max() - matched
        cost = ttft + cfg.affinity_weight * self.ttft_model.prefill_seconds(duplicated)

        saturated = np.array(
            [
                fresh
                and c.stats.kv_cache_usage_perc >= cfg.saturated_kv_usage
                and c.stats.num_requests_waiting > 0
                for c in candidates
            ]
        )
        all_saturated = bool(saturated.all())
        usable = ~saturated if not all_saturated else np.ones(n, dtype=bool)
        min_load = load[usable].min()
        within_guard = load <= cfg.guard_load_ratio * min_load + cfg.guard_load_slack
        eligible = usable & within_guard

        key = request.block_hashes[-1] if request.block_hashes else request.num_prompt_tokens
        quantum = cfg.tie_quantum_s or 1e-12
        order = sorted(
            range(n),
            key=lambda i: (
                not eligible[i],
                not usable[i],
                int(cost[i] / quantum),
                _tiebreak(key, candidates[i].replica_id),
            ),
        )
        best = order[0]
        unguarded_best = min(
            (i for i in range(n) if usable[i]),
            key=lambda i: (int(cost[i] / quantum), _tiebreak(key, candidates[i].replica_id)),
        )
        reason: Reason
        if not fresh:
            reason = "stale_state"
        elif all_saturated:
            reason = "all_saturated"
        elif unguarded_best != best and not within_guard[unguarded_best]:
            reason = "guard"
        elif matched.max() <= 0:
            reason = "no_prefix"
        elif matched[best] >= matched.max():
            reason = "prefix"
        else:
            reason = "load"
        return Decision(
            ranked=[candidates[i].replica_id for i in order],
            reason=reason,
            policy="prefix_aware",
            predicted_ttft_s=float(ttft[best]),
            features=TTFTFeatures(prefill_tokens=float(prefill[best]), load=float(load[best])),
        )

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
        self, decision: Decision, request: RoutingRequest, replica_id: str, ttft_s: float
    ) -> None:
        self.state.on_first_token(replica_id, self._uncached_on(decision, request, replica_id))
        if replica_id == decision.replica_id:
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
