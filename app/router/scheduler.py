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
        default=3.0, ge=1.0, description="A replica may carry at most this multiple of the least-loaded one's load..."
    )
    guard_load_slack: int = Field(
        default=16,
        ge=0,
        description="...plus this many requests. The guard is a backstop for a wrong cost model (a hot "
        "prefix, a stale fit), not the load balancer: each request it moves recomputes its whole prefix, "
        "so a tight guard turns ordinary Poisson bursts into cache misses (benchmarks/README.md).",
    )
    saturated_kv_usage: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="KV usage at which a replica with a queue is skipped while others are not. At 1.0 only "
        "a replica with every block in use is skipped: a lower threshold sends requests away from the "
        "replicas that hold their prefix whenever caches run full, which is exactly when misses hurt most "
        "(measured in benchmarks/README.md); the cost model already prices the queue.",
    )
    affinity_weight: float = Field(
        default=1.0,
        ge=0,
        description="Extra cost, as a fraction of their prefill time, for the prefix tokens a replica would "
        "have to duplicate from the best holder: 1 prices the duplicate at the compute it wastes (and the "
        "copy evicts something else there).",
    )
    miss_externality: float = Field(
        default=1.0,
        ge=0,
        description="Weight of the delay a request's uncached prefill imposes on the requests already "
        "on a replica (their count x its prefill time). 0 ranks by the request's own TTFT alone.",
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


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _rendezvous(key: int, id_hashes: np.ndarray) -> np.ndarray:
    """splitmix64 of (replica id hash xor the prompt's key): a stable, uniform score per replica."""
    z = id_hashes ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@dataclass(slots=True)
class _Fleet:
    """The candidates for one (model, roles), with what does not change between decisions."""

    version: int
    states: list[ReplicaState]
    ids: list[str]
    bits: np.ndarray
    block_sizes: np.ndarray
    id_hashes: np.ndarray
    batch_capacity: np.ndarray
    """Each engine's max_num_seqs (infinite where unknown)."""


class Scheduler:
    def __init__(self, state: ClusterState, config: RoutingConfig | None = None) -> None:
        self.state = state
        self.config = config or RoutingConfig()
        self.ttft_model = TTFTModel(self.config.ttft_prior)
        self._rng = random.Random(self.config.seed)
        self._round_robin = 0
        self._avg_uncached_tokens = 512.0
        self._fleets: dict[tuple[str, tuple[ReplicaRole, ...]], _Fleet] = {}

    def schedule(self, request: RoutingRequest, now: float) -> Decision | None:
        """Rank the model's replicas for this request; None when none are known."""
        fleet = self._fleet(request.model, request.roles)
        if not fleet.states:
            return None
        fresh = self.state.is_fresh(now)
        blocks = self._prefix_blocks(fleet, request, now) if fresh else np.zeros(len(fleet.ids), dtype=np.int64)
        policy = self.config.policy
        if policy == "round_robin":
            decision = self._round_robin_rank(fleet.states)
        elif policy in ("power_of_two", "ray_prefix_cache_affinity"):
            decision = self._power_of_two_rank(fleet.states)
        else:
            decision = self._prefix_aware_rank(fleet, request, blocks, fresh)
        decision.matched_by_replica = {fleet.ids[i]: int(blocks[i]) for i in np.flatnonzero(blocks)}
        matched = self._matched_tokens(request, decision.matched_by_replica.get(decision.replica_id, 0))
        decision.matched_tokens = matched
        decision.uncached_tokens = request.num_prompt_tokens - matched
        self._avg_uncached_tokens += 0.05 * (decision.uncached_tokens - self._avg_uncached_tokens)
        return decision

    def observe_ttft(self, decision: Decision, ttft_s: float) -> None:
        if decision.features is not None:
            self.ttft_model.observe(decision.features, ttft_s)

    def _fleet(self, model: str, roles: tuple[ReplicaRole, ...]) -> _Fleet:
        key = (model, roles)
        fleet = self._fleets.get(key)
        if fleet is None or fleet.version != self.state.membership_version:
            states = sorted(self.state.candidates(model, roles), key=lambda s: s.replica_id)
            ids = [s.replica_id for s in states]
            index = self.state.index
            fleet = _Fleet(
                version=self.state.membership_version,
                states=states,
                ids=ids,
                bits=np.array([index.bit_of(i) for i in ids], dtype=np.int64),
                block_sizes=np.array([s.info.block_size for s in states], dtype=np.int64),
                id_hashes=np.array([xxhash.xxh3_64_intdigest(i.encode()) for i in ids], dtype=np.uint64),
                batch_capacity=np.array(
                    [s.info.max_num_seqs or np.inf for s in states], dtype=np.float64
                ),
            )
            self._fleets[key] = fleet
        return fleet

    def _prefix_blocks(self, fleet: _Fleet, request: RoutingRequest, now: float) -> np.ndarray:
        """Leading prompt blocks each candidate holds (0 where its block size differs from the request's)."""
        counts = self.state.prefix_blocks_by_bit(request.block_hashes, now)
        if counts is None:
            return np.zeros(len(fleet.ids), dtype=np.int64)
        blocks = counts[fleet.bits].astype(np.int64)
        blocks[fleet.block_sizes != request.block_size] = 0
        return blocks

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
        self, fleet: _Fleet, request: RoutingRequest, blocks: np.ndarray, fresh: bool
    ) -> Decision:
        cfg = self.config
        n = len(fleet.states)
        prompt = request.num_prompt_tokens
        signals = np.array(
            [
                (s.load, s.pending_prefill_tokens, s.stats.num_requests_waiting, s.stats.kv_cache_usage_perc)
                for s in fleet.states
            ],
            dtype=np.float64,
        ).reshape(n, 4)
        load, pending, waiting, kv_usage = signals.T
        matched = np.minimum(blocks * request.block_size, max(prompt - 1, 0)).astype(np.float64)
        ahead = np.maximum(pending, waiting * self._avg_uncached_tokens)
        uncached = prompt - matched
        prefill = ahead + uncached
        queued = np.maximum(load - fleet.batch_capacity, 0.0)
        ttft = self.ttft_model.predict_many(prefill, load, queued)
        duplicated = matched.max() - matched
        # The request's own TTFT is not the whole price of sending it somewhere. Its uncached prefill
        # also stalls every request already on that replica (their decode steps share the batch,
        # queued ones start later): `load` x that prefill time. Without this term a busy fleet
        # spreads each group over every replica, hit rates fall, prefill work grows and queues grow
        # further. Prefix it would duplicate from a holder also evicts something else there.
        cost = (
            ttft
            + self.ttft_model.miss_seconds(uncached) * load * cfg.miss_externality
            + self.ttft_model.miss_seconds(duplicated) * cfg.affinity_weight
        )

        saturated = fresh & (kv_usage >= cfg.saturated_kv_usage) & (waiting > 0)
        all_saturated = bool(saturated.all())
        usable = ~saturated if not all_saturated else np.ones(n, dtype=bool)
        min_load = load[usable].min()
        within_guard = load <= cfg.guard_load_ratio * min_load + cfg.guard_load_slack
        eligible = usable & within_guard

        key = request.block_hashes[-1] if request.block_hashes else request.num_prompt_tokens
        tiebreak = _rendezvous(key, fleet.id_hashes)
        quantized = np.floor(cost / (cfg.tie_quantum_s or 1e-12)).astype(np.int64)
        order = np.lexsort((tiebreak, quantized, ~usable, ~eligible))
        best = int(order[0])
        unguarded = np.lexsort((tiebreak, quantized, ~usable))[0]
        reason: Reason
        if not fresh:
            reason = "stale_state"
        elif all_saturated:
            reason = "all_saturated"
        elif unguarded != best and not within_guard[unguarded]:
            reason = "guard"
        elif matched.max() <= 0:
            reason = "no_prefix"
        elif matched[best] >= matched.max():
            reason = "prefix"
        else:
            reason = "load"
        return Decision(
            ranked=[fleet.ids[i] for i in order],
            reason=reason,
            policy="prefix_aware",
            predicted_ttft_s=float(ttft[best]),
            features=TTFTFeatures(
                prefill_tokens=float(prefill[best]), load=float(load[best]), queued=float(queued[best])
            ),
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
