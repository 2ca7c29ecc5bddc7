"""The cluster-wide state actor: one named actor per application.

Engine replicas register (model, role, cache geometry) and send stats (when they change) and
KV-event batches to it; ingress replicas pull versioned deltas into their local `ClusterState` copies
and push the speculative entries they create when routing. Every method runs on the actor's event
loop, and only `sync` ever awaits (the long poll), so each change is atomic.

Control traffic is paid per change, not per tick: a router's sync waits at the actor (up to its
`wait_s`) until something it has not seen happens, and carries only what changed (stats of the
replicas that changed, membership only when it changed, index ops since its version). An idle fleet
costs about one call a second per router and per engine (a heartbeat).

The actor restarts if it dies (max_restarts=-1); it comes back empty with a new epoch, engines
notice that their reports are refused and register again with their whole cache contents, and
routers notice the new epoch and take a full snapshot. Routing never waits for any of this.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import ray

from app.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventDecodeError, decode_batch
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
    replicas: list[ReplicaInfo] | None
    """Every registered replica, when the membership changed since the router's `membership`; else None."""
    membership: int
    stats: dict[str, ReplicaStats]
    """The stats that changed since the router's `stats_version` (all of them after a membership change)."""
    stats_version: int
    ops: list[IndexOp] = field(default_factory=list)
    full_index: dict[str, list[int]] | None = None
    """Set instead of `ops` when the router is new, behind the log, or from an older epoch."""
    live: dict[str, Any] | None = None
    """The live settings (app/config/live.py LiveState) set while serving, when newer than the router's
    `live_version`."""
    live_version: int = 0


Report = tuple[str, ReplicaStats | None, list[bytes]]
"""One replica's report: its id, its stats if they changed since its last report, its KV-event batches."""


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
        self._stats_version = 0
        self._stats_changed: dict[str, int] = {}
        self._live: dict[str, Any] | None = None
        self._live_version = 0
        self._live_args = ""
        """The digest of the application `args` the live settings belong to."""
        self._live_user_config = ""
        """The digest of the last ingress `user_config` put in force (see `offer_live`)."""
        self._news: asyncio.Future[None] | None = None
        """Resolved (and replaced) whenever anything a router could sync changes."""

    # -- engines -------------------------------------------------------------------------------

    def register(self, info: ReplicaInfo, cached_block_hashes: list[int] | None = None) -> str:
        self.state.register(info)
        self._last_seen[info.replica_id] = time.monotonic()
        self._notify()
        if cached_block_hashes is not None:
            # A (re-)registration carries the whole cache: start this replica's entries afresh.
            self.state.index.clear(info.replica_id)
            self._append(IndexOp("clear", info.replica_id))
            if cached_block_hashes:
                self.state.index.add(info.replica_id, cached_block_hashes)
                self._append(IndexOp("store", info.replica_id, list(cached_block_hashes)))
        logger.info("replica %s registered for model %s (%s)", info.replica_id, info.model, info.role)
        return self.epoch

    def report(self, replica_id: str, stats: ReplicaStats | None, kv_event_batches: list[bytes]) -> bool:
        """Stats (None: unchanged) and KV events from a replica; False means "unknown, register again"."""
        if replica_id not in self.state.replicas:
            return False
        now = time.monotonic()
        self._last_seen[replica_id] = now
        if stats is not None:
            self.state.update_stats(replica_id, stats, now)
            self._stats_version += 1
            self._stats_changed[replica_id] = self._stats_version
            self._notify()
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

    def report_many(self, reports: list[Report]) -> list[bool]:
        """Several replicas' reports in one call (a watcher of external servers sends all of its)."""
        return [self.report(replica_id, stats, batches) for replica_id, stats, batches in reports]

    def unregister(self, replica_id: str) -> None:
        self.state.unregister(replica_id)
        self._last_seen.pop(replica_id, None)
        self._stats_changed.pop(replica_id, None)
        self._notify()

    # -- routers -------------------------------------------------------------------------------

    def speculate(self, router_id: str, speculated: list[tuple[str, list[int]]]) -> None:
        """A router's routing-time guesses: shared with the other routers through the log."""
        for replica_id, hashes in speculated:
            replica = self.state.replicas.get(replica_id)
            if replica is not None:
                self._append(IndexOp("speculate", replica_id, hashes, origin=router_id))
                if not replica.info.kv_events:
                    # For a server without events the routers' guesses are all anyone will ever know of
                    # its cache: they belong in the snapshot a new (or lagging) router starts from.
                    self.state.index.add(replica_id, hashes)

    # -- live settings (app/config/live.py): the latest for every replica of the app ---------------
    # Each is tied to a digest of the application's `args`: settings made for other args (before a
    # redeploy that restarted everything) are not handed to replicas of the new ones.

    def _put_live(self, live: dict[str, Any]) -> None:
        self._live, self._live_version = live, self._live_version + 1
        self._notify()

    def offer_live(self, args_digest: str, user_config_digest: str, live: dict[str, Any]
                   ) -> tuple[int, dict[str, Any] | None]:
        """An ingress replica starting, or reconfigured by Serve: its settings (its args', with its
        user_config if it has one) are put in force when its args are new here, or when its user_config
        is not the one last put in force; otherwise the settings in force stay, so a replica started
        later with the same user_config does not undo handle changes made since. Returns the version and
        the settings in force."""
        if args_digest != self._live_args:
            self._live_args, self._live_user_config = args_digest, user_config_digest
            self._put_live(live)
        elif user_config_digest and user_config_digest != self._live_user_config:
            self._live_user_config = user_config_digest
            self._put_live(live)
        return self._live_version, self._live

    def set_live(self, args_digest: str, expected_version: int, live: dict[str, Any]) -> tuple[bool, int]:
        """A handle change (checked by the ingress that asks), put in force only if it was made on top of the
        settings in force (`expected_version`), so two changes made at once on two replicas cannot undo
        each other: the later is refused and made again on top of the first. Returns (put, version)."""
        if args_digest != self._live_args or expected_version != self._live_version:
            return False, self._live_version
        self._put_live(live)
        return True, self._live_version

    def restore_live(self, args_digest: str, user_config_digest: str, live: dict[str, Any]) -> None:
        """After this actor restarted (empty): an ingress replica puts back the settings it serves."""
        if self._live is None:
            self._live_args, self._live_user_config = args_digest, user_config_digest
            self._put_live(live)

    def adapters_of(self, model: str, version: int, args_digest: str) -> tuple[int, dict[str, str] | None]:
        """For an engine replica: the model's adapters (name -> path) when the live settings are not the
        `version` it has, are for its args, and name the model; else None (keep what it serves)."""
        # Unequal, not older: a restarted actor counts from 0 again.
        if self._live is None or version == self._live_version or args_digest != self._live_args:
            return self._live_version, None
        return self._live_version, self._live.get("adapters", {}).get(model)

    async def sync(
        self, router_id: str, epoch: str, version: int, membership: int = -1, stats_version: int = -1,
        wait_s: float = 0.0, speculated: list[tuple[str, list[int]]] | None = None, live_version: int = 0,
    ) -> SyncReply:
        """The router's speculative entries in, what it has not seen out. With `wait_s`, wait up to that
        long for something new first."""
        if speculated:
            self.speculate(router_id, speculated)
        self._expire_silent_replicas()
        if wait_s > 0 and live_version == self._live_version and not self._news_for(
                router_id, epoch, version, membership, stats_version):
            news = self._news_future()
            try:
                await asyncio.wait_for(asyncio.shield(news), wait_s)
            except TimeoutError:
                pass
            self._expire_silent_replicas()
        fresh = epoch != self.epoch or membership != self.state.membership_version
        reply = SyncReply(
            epoch=self.epoch,
            version=self._version,
            replicas=[s.info for s in self.state.replicas.values()] if fresh else None,
            membership=self.state.membership_version,
            stats={rid: self.state.replicas[rid].stats for rid, v in self._stats_changed.items()
                   if (fresh or v > stats_version) and rid in self.state.replicas},
            stats_version=self._stats_version,
            live=self._live if live_version != self._live_version else None,
            live_version=self._live_version,
        )
        oldest = self._log[0][0] if self._log else self._version + 1
        if epoch != self.epoch or version + 1 < oldest:
            reply.full_index = self.state.index.dump()
            return reply
        reply.ops = [
            op for v, op in self._log if v > version and not (op.kind == "speculate" and op.origin == router_id)
        ]
        return reply

    def _news_for(self, router_id: str, epoch: str, version: int, membership: int, stats_version: int) -> bool:
        if epoch != self.epoch or membership != self.state.membership_version or stats_version < self._stats_version:
            return True
        for v, op in reversed(self._log):
            if v <= version:
                break
            if not (op.kind == "speculate" and op.origin == router_id):
                return True
        return False

    def _news_future(self) -> asyncio.Future[None]:
        if self._news is None or self._news.done():
            self._news = asyncio.get_running_loop().create_future()
        return self._news

    def _notify(self) -> None:
        if self._news is not None and not self._news.done():
            self._news.set_result(None)

    def match(self, block_hashes: list[int]) -> dict[str, int]:
        """Leading blocks of a prompt each replica holds, as the engines' KV events say (for operators
        checking that the gateway's keys are the engines' own, and for tests)."""
        return self.state.index.match(block_hashes)

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
        self._notify()

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
