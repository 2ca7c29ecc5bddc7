"""The router's picture of the fleet: registered replicas, their latest stats, the prefix index,
and this router's own in-flight bookkeeping.

The cluster-wide actor keeps one of these as the authority; every ingress replica keeps a copy fed
from it, so routing reads local memory only. Time is passed in (`now`, seconds on any monotonic
clock) so the discrete-event simulator can drive the very same code in virtual time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from app.protocol.engine import EngineLoad
from app.router.prefix_index import PrefixIndex, SpeculativeEntries

ReplicaRole = Literal["mixed", "prefill", "decode"]


class ReplicaInfo(BaseModel):
    """What an engine replica tells the router when it registers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replica_id: str
    model: str
    role: ReplicaRole = "mixed"
    engine_id: str = ""
    block_size: int = Field(gt=0)
    num_gpu_blocks: int = Field(gt=0, description="KV cache capacity in blocks; bounds the index.")
    max_num_seqs: int | None = None
    hash_algo: str = "sha256"
    hash_seed: str = "0"
    kv_events: bool = Field(default=True, description="Whether the engine publishes KV events.")
    lists_adapters: bool = Field(
        default=False, description="Whether the replica's stats list the LoRA adapters it serves (engine replicas "
        "the gateway runs): until they do, it serves none. Others are assumed to serve every adapter asked of them.")
    endpoint_url: str | None = Field(
        default=None,
        description="The engine's own OpenAI server, when it has one: routers stream from it directly.",
    )
    node_id: str | None = Field(
        default=None, description="The cluster node the engine runs on (a loopback endpoint is reachable only there)."
    )
    metrics_dialect: str = Field(
        default="vllm", description="What the engine's metrics speak: vllm, sglang, or none (its load is the "
        "routers' own count of requests in flight there)."
    )


ReplicaStats = EngineLoad
"""An engine's load signals as the router keeps them (one definition, in app/protocol/engine.py)."""


@dataclass(slots=True)
class ReplicaState:
    info: ReplicaInfo
    stats: ReplicaStats = field(default_factory=ReplicaStats)
    stats_at: float = float("-inf")
    """When this router last received stats (its own clock)."""
    inflight: int = 0
    """Requests this router sent that have not finished."""
    pending_prefill_tokens: int = 0
    """Uncached prompt tokens of requests this router sent that have no first token yet."""
    sent_adapters: dict[str, float] = field(default_factory=dict)
    """LoRA adapters this router sent requests for, and when (its own clock): the engine has them in a
    slot before its stats say so."""

    @property
    def replica_id(self) -> str:
        return self.info.replica_id

    @property
    def reported_load(self) -> int:
        return self.stats.num_requests_running + self.stats.num_requests_waiting

    @property
    def load(self) -> int:
        # Stats lag by up to one report interval and other ingress replicas' requests only show up
        # there; this router's own in-flight count is exact for its share. The larger of the two.
        return max(self.reported_load, self.inflight)


class ClusterState:
    def __init__(self, *, speculative_ttl_s: float = 5.0, stale_after_s: float = 2.0) -> None:
        self.replicas: dict[str, ReplicaState] = {}
        self.index = PrefixIndex()
        self.speculative = SpeculativeEntries(self.index, speculative_ttl_s)
        self.stale_after_s = stale_after_s
        self.synced_at = float("-inf")
        """When this copy last heard from the authority (the actor); the actor itself sets it always."""
        self.membership_version = 0
        """Bumped whenever a replica joins, leaves or changes, so callers can cache per-fleet views."""

    # -- membership ----------------------------------------------------------------------------

    def register(self, info: ReplicaInfo) -> None:
        existing = self.replicas.get(info.replica_id)
        if existing is not None and existing.info == info:
            return
        if existing is not None and existing.info.engine_id != info.engine_id:
            # Same replica, new engine process: whatever it cached before is gone.
            self.index.clear(info.replica_id)
        self.replicas[info.replica_id] = ReplicaState(info=info) if existing is None else ReplicaState(
            info=info, stats=existing.stats, stats_at=existing.stats_at, inflight=existing.inflight,
            pending_prefill_tokens=existing.pending_prefill_tokens,
        )
        self.index.add_replica(info.replica_id, info.num_gpu_blocks)
        self.membership_version += 1

    def unregister(self, replica_id: str) -> None:
        if self.replicas.pop(replica_id, None) is not None:
            self.membership_version += 1
        self.speculative.drop_replica(replica_id)  # before the index frees the replica's bit
        self.index.remove_replica(replica_id)

    def retain(self, replica_ids: Iterable[str]) -> None:
        keep = set(replica_ids)
        for replica_id in [r for r in self.replicas if r not in keep]:
            self.unregister(replica_id)

    # -- signals -------------------------------------------------------------------------------

    def update_stats(self, replica_id: str, stats: ReplicaStats, now: float) -> None:
        state = self.replicas.get(replica_id)
        if state is not None:
            state.stats = stats
            state.stats_at = now

    def apply_kv_events(self, replica_id: str, events: Sequence[KVEvent]) -> None:
        if replica_id not in self.replicas:
            return
        # Consecutive events of one kind are applied as one batch: the index pays per call, and an
        # engine step publishes one event per request. Order between kinds is kept, so a block
        # stored then removed ends up removed.
        run: list[int] = []
        run_kind: type | None = None
        for event in [*events, None]:
            kind = type(event) if event is not None else None
            if run_kind is not None and kind is not run_kind:
                if run_kind is BlockStored:
                    self.index.add(replica_id, run)
                else:
                    self.index.remove(replica_id, run)
                run, run_kind = [], None
            if isinstance(event, BlockStored):
                run.extend(event.block_hashes)
                run_kind = BlockStored
            elif isinstance(event, BlockRemoved):
                run.extend(event.block_hashes)
                run_kind = BlockRemoved
            elif isinstance(event, AllBlocksCleared):
                self.index.clear(replica_id)

    def note_routed(self, replica_id: str, block_hashes: Sequence[int], now: float) -> None:
        """A request with these blocks was just sent to the replica: expect them cached there soon."""
        state = self.replicas.get(replica_id)
        if state is None or not block_hashes:
            return
        if state.info.kv_events:
            self.speculative.add(replica_id, block_hashes, now)
        else:
            # Without events nothing will confirm or evict, so the guess goes straight into the
            # index, bounded by the engine's capacity like everything else there.
            self.index.add(replica_id, block_hashes)

    # -- queries -------------------------------------------------------------------------------

    def is_fresh(self, now: float) -> bool:
        return now - self.synced_at <= self.stale_after_s

    def prefix_blocks_by_bit(self, block_hashes: Sequence[int], now: float) -> np.ndarray | None:
        """Leading blocks of the prompt each replica holds (or was just sent), indexed by the replica's
        index bit; None when nobody holds the first block."""
        if not block_hashes:
            return None
        self.speculative.expire(now)
        return self.index.match_counts(block_hashes, self.speculative.rows(block_hashes))

    def candidates(self, model: str, roles: Sequence[ReplicaRole] = ("mixed",)) -> list[ReplicaState]:
        return [s for s in self.replicas.values() if s.info.model == model and s.info.role in roles]

    # -- this router's own requests ------------------------------------------------------------

    def on_dispatch(self, replica_id: str, uncached_tokens: int) -> None:
        state = self.replicas.get(replica_id)
        if state is not None:
            state.inflight += 1
            state.pending_prefill_tokens += uncached_tokens

    def on_first_token(self, replica_id: str, uncached_tokens: int) -> None:
        state = self.replicas.get(replica_id)
        if state is not None:
            state.pending_prefill_tokens = max(0, state.pending_prefill_tokens - uncached_tokens)

    def on_finish(self, replica_id: str, uncached_tokens: int, got_first_token: bool) -> None:
        state = self.replicas.get(replica_id)
        if state is not None:
            state.inflight = max(0, state.inflight - 1)
            if not got_first_token:
                state.pending_prefill_tokens = max(0, state.pending_prefill_tokens - uncached_tokens)
