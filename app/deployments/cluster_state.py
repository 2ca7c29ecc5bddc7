"""The cluster-wide state actor: one named actor per application.

Engine replicas register (model, role, cache geometry) and stream stats and KV-event batches to it;
ingress replicas pull versioned deltas into their local `ClusterState` copies and push the
speculative entries they create when routing. All methods run on the actor's event loop without
interleaving, so each is atomic.

The actor restarts if it dies (max_restarts=-1); it comes back empty with a new epoch, engines
notice that their reports are refused and register again with their whole cache contents, and
routers notice the new epoch and take a full snapshot. Routing never waits for any of this.
It is a plain (threadless, max_concurrency 1) actor: calls are short and run one at a time.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import ray

from app.router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventDecodeError, decode_batch
from app.router.state import ClusterState, ReplicaInfo, ReplicaStats

logger = logging.getLogger(__name__)

NAMESPACE = "llm_gateway"

OpKind = Literal["store", "remove", "clear", "speculate"]


@dataclass(slots=True)
class IndexOp:
    kind: OpKind
    replica_id: str
    hashes: list[int] = field(default_factory=list)
    origin: str = ""
    """For `speculate`: the router that made the guess (it already has it)."""


@dataclass(slots=True)
class SyncReply:
    epoch: str
    version: int
    replicas: list[ReplicaInfo]
    stats: dict[str, ReplicaStats]
    ops: list[IndexOp] = field(default_factory=list)
    full_index: dict[str, list[int]] | None = None
    """Set instead of `ops` when the router is new, behind the log, or from an older epoch."""


def actor_name(app_name: str) -> str:
    return f"cluster-state:{app_name or 'default'}"


class ClusterStateActor:
    def __init__(self, replica_timeout_s: float = 10.0, max_log_ops: int = 50_000) -> None:
        self.epoch = uuid.uuid4().hex
        self.state = ClusterState()
        self.replica_timeout_s = replica_timeout_s
        self._log: deque[tuple[int, IndexOp]] = deque(maxlen=max_log_ops)
        self._version = 0
        self._last_seen: dict[str, float] = {}
        self._decode_errors = 0

    # -- engines -------------------------------------------------------------------------------

    def register(self, info: ReplicaInfo, cached_block_hashes: list[int] | None = None) -> str:
        self.state.register(info)
        self._last_seen[info.replica_id] = time.monotonic()
        if cached_block_hashes is not None:
            # A (re-)registration carries the whole cache: start this replica's entries afresh.
            self.state.index.clear(info.replica_id)
            self._append(IndexOp("clear", info.replica_id))
            if cached_block_hashes:
                self.state.index.add(info.replica_id, cached_block_hashes)
                self._append(IndexOp("store", info.replica_id, list(cached_block_hashes)))
        logger.info("replica %s registered for model %s (%s)", info.replica_id, info.model, info.role)
        return self.epoch

    def report(self, replica_id: str, stats: ReplicaStats, kv_event_batches: list[bytes]) -> bool:
        """Stats and KV events from a replica; False means "unknown, register again"."""
        if replica_id not in self.state.replicas:
            return False
        now = time.monotonic()
        self._last_seen[replica_id] = now
        self.state.update_stats(replica_id, stats, now)
        for payload in kv_event_batches:
            try:
                batch = decode_batch(payload)
            except KVEventDecodeError as error:
                self._decode_errors += 1
                logger.warning("dropping a KV event batch from %s: %s", replica_id, error)
                continue
            self.state.apply_kv_events(replica_id, batch.events)
            for event in batch.events:
                if isinstance(event, BlockStored):
                    self._append(IndexOp("store", replica_id, list(event.block_hashes)))
                elif isinstance(event, BlockRemoved):
                    self._append(IndexOp("remove", replica_id, list(event.block_hashes)))
                elif isinstance(event, AllBlocksCleared):
                    self._append(IndexOp("clear", replica_id))
        return True

    def unregister(self, replica_id: str) -> None:
        self.state.unregister(replica_id)
        self._last_seen.pop(replica_id, None)

    # -- routers -------------------------------------------------------------------------------

    def sync(
        self, router_id: str, epoch: str, version: int, speculated: list[tuple[str, list[int]]]
    ) -> SyncReply:
        self._expire_silent_replicas()
        for replica_id, hashes in speculated:
            replica = self.state.replicas.get(replica_id)
            if replica is not None:
                self._append(IndexOp("speculate", replica_id, hashes, origin=router_id))
                if not replica.info.kv_events:
                    # For a server without events the routers' guesses are all anyone will ever know of
                    # its cache: they belong in the snapshot a new (or lagging) router starts from.
                    self.state.index.add(replica_id, hashes)
        reply = SyncReply(
            epoch=self.epoch,
            version=self._version,
            replicas=[s.info for s in self.state.replicas.values()],
            stats={rid: s.stats for rid, s in self.state.replicas.items()},
        )
        oldest = self._log[0][0] if self._log else self._version + 1
        if epoch != self.epoch or version + 1 < oldest:
            reply.full_index = self.state.index.dump()
            return reply
        reply.ops = [
            op for v, op in self._log if v > version and not (op.kind == "speculate" and op.origin == router_id)
        ]
        return reply

    def describe(self) -> dict[str, Any]:
        """For operators and tests: what the actor knows."""
        return {
            "epoch": self.epoch,
            "version": self._version,
            "replicas": {
                rid: {
                    "model": s.info.model,
                    "role": s.info.role,
                    "blocks": self.state.index.num_blocks(rid),
                    "stats": s.stats.model_dump(),
                }
                for rid, s in self.state.replicas.items()
            },
            "index_entries": self.state.index.entries(),
            "index_bytes": self.state.index.nbytes(),
            "kv_event_decode_errors": self._decode_errors,
        }

    # -- internals -----------------------------------------------------------------------------

    def _append(self, op: IndexOp) -> None:
        self._version += 1
        self._log.append((self._version, op))

    def _expire_silent_replicas(self) -> None:
        deadline = time.monotonic() - self.replica_timeout_s
        for replica_id in [r for r, seen in self._last_seen.items() if seen < deadline]:
            logger.warning("replica %s has not reported for %.0fs; dropping it", replica_id, self.replica_timeout_s)
            self.unregister(replica_id)


RemoteClusterState = ray.remote(ClusterStateActor)


def get_or_create_state_actor(app_name: str, replica_timeout_s: float = 10.0, max_log_ops: int = 50_000) -> Any:
    """The application's state actor, created by whichever replica asks first."""
    return RemoteClusterState.options(
        name=actor_name(app_name),
        namespace=NAMESPACE,
        get_if_exists=True,
        # Outlives the replica that happened to create it; restarted (empty) if it dies.
        lifetime="detached",
        max_restarts=-1,
        num_cpus=0,
    ).remote(replica_timeout_s, max_log_ops)
