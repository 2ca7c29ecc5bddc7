"""Background links to the state actor: engines report to it, ingress replicas sync from it.

Both loops survive the actor dying: a failed call is logged (once per outage), the handle is looked
up again by name, and the loop carries on. Nothing on a request's path awaits these loops. Both
send only what changed (see app/deployments/state_actor.py), so an idle fleet costs next to nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from app.config import ClusterStateConfig
from app.deployments.state_actor import IndexOp, Report, SyncReply, get_or_create_state_actor
from app.engines.adapter_catalog import AdapterCatalog
from app.router.state import ClusterState, ReplicaInfo, ReplicaStats

logger = logging.getLogger(__name__)


class _ActorLink:
    """The actor handle, re-resolved after failures; logs each outage once."""

    def __init__(self, app_name: str, config: ClusterStateConfig, what: str) -> None:
        self._app_name = app_name
        self._config = config
        self._what = what
        self._actor: Any = None
        self._failing_since: float | None = None

    def actor(self) -> Any:
        if self._actor is None:
            self._actor = get_or_create_state_actor(
                self._app_name, self._config.replica_timeout_s, self._config.max_log_ops
            )
        return self._actor

    def failed(self, error: BaseException) -> None:
        self._actor = None
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning("%s: cluster state actor unreachable (%s); routing on local load meanwhile",
                           self._what, error)

    def succeeded(self) -> None:
        if self._failing_since is not None:
            logger.info("%s: cluster state actor back after %.1fs", self._what, time.monotonic() - self._failing_since)
            self._failing_since = None


class KVEventSource(Protocol):
    """What the reporter reads from an engine (or from an external server's event subscriber)."""

    def take_kv_events(self) -> list[bytes]: ...

    def cached_block_hashes(self) -> list[int] | None: ...


class EngineReporter:
    """Registers an engine replica and keeps the actor current: stats when they change, KV events as they
    come, and a heartbeat every `heartbeat_s` otherwise (a replica silent for `replica_timeout_s` is
    dropped from the candidates)."""

    def __init__(self, app_name: str, info: ReplicaInfo, engine: KVEventSource, stats: Callable[[], ReplicaStats],
                 config: ClusterStateConfig) -> None:
        self.info = info
        self._engine = engine
        self._stats = stats
        self._config = config
        self._link = _ActorLink(app_name, config, f"engine replica {info.replica_id}")
        self._registered = False
        self._sent: tuple[Any, ...] | None = None
        self._sent_at = float("-inf")

    async def run(self) -> None:
        while True:
            await self.report_safely()
            await asyncio.sleep(self._config.report_interval_s)

    async def report_safely(self) -> bool:
        """One report; a failure is logged (once per outage) and retried on the next call."""
        try:
            await self.report_once()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the actor is restarting or gone: keep serving, retry
            self.failed(error)
            return False
        self._link.succeeded()
        return True

    def failed(self, error: BaseException) -> None:
        self._registered = False
        self._link.failed(error)

    def reregister(self, info: ReplicaInfo | None = None) -> None:
        """Register again on the next report, with the cache contents then (a restarted engine: empty)."""
        if info is not None:
            self.info = info
        self._registered = False

    @property
    def registered(self) -> bool:
        return self._registered

    async def ensure_registered(self) -> None:
        if not self._registered:
            # The full cache contents replace whatever the actor had for us; events up to now are in it.
            self._engine.take_kv_events()
            await self._link.actor().register.remote(self.info, self._engine.cached_block_hashes())
            self._registered = True
            self._sent = None  # the actor has no stats from this registration yet

    def pending(self, now: float) -> Report | None:
        """What to tell the actor now, or None when nothing changed and no heartbeat is due."""
        stats = self._stats()
        signature = stats.signature()
        events = self._engine.take_kv_events()
        changed = signature != self._sent
        if not (changed or events or now - self._sent_at >= self._config.heartbeat_s):
            return None
        self._sent, self._sent_at = signature, now
        return (self.info.replica_id, stats if changed else None, events)

    def accepted(self, accepted: bool) -> None:
        if not accepted:
            self._registered = False  # the actor restarted and forgot us: register again next round

    async def report_once(self) -> None:
        await self.ensure_registered()
        report = self.pending(time.monotonic())
        if report is not None:
            self.accepted(await self._link.actor().report.remote(*report))

    async def unregister(self) -> None:
        try:
            await self._link.actor().unregister.remote(self.info.replica_id)
        except Exception:  # shutting down; the actor times us out anyway
            pass


class AdapterSync:
    """Brings an engine replica's adapters to what the live settings list for its model: asks the actor
    every `poll_s` (a change takes effect within that), and reconciles until the engine matches."""

    def __init__(self, app_name: str, model: str, config: ClusterStateConfig, args_digest: str,
                 poll_s: float = 0.25) -> None:
        self._model = model
        self._args_digest = args_digest
        self._poll_s = poll_s
        self._version = 0
        self._link = _ActorLink(app_name, config, f"adapters of {model}")

    async def run(self, catalog: AdapterCatalog, busy: Callable[[], set[str]]) -> None:
        while True:
            try:
                version, adapters = await self._link.actor().adapters_of.remote(self._model, self._version,
                                                                                self._args_digest)
                self._link.succeeded()
                if adapters is not None:
                    catalog.want(adapters, time.monotonic())
                self._version = version
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the actor is restarting or gone: keep serving what is loaded
                self._link.failed(error)
            if not catalog.settled:
                await catalog.reconcile(busy, time.monotonic())
            await asyncio.sleep(self._poll_s)


class BatchReporter:
    """Reports for many replicas in one actor call per round (a watcher's external servers)."""

    def __init__(self, app_name: str, config: ClusterStateConfig, what: str) -> None:
        self._link = _ActorLink(app_name, config, what)

    async def report(self, reporters: list[EngineReporter]) -> None:
        try:
            for reporter in reporters:
                await reporter.ensure_registered()
            now = time.monotonic()
            batch = [(reporter, report) for reporter in reporters
                     if (report := reporter.pending(now)) is not None]
            if batch:
                results = await self._link.actor().report_many.remote([report for _, report in batch])
                for (reporter, _), accepted in zip(batch, results, strict=True):
                    reporter.accepted(accepted)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the actor is restarting or gone: register again when it is back
            for reporter in reporters:
                reporter.failed(error)
            self._link.failed(error)
            return
        self._link.succeeded()


class RouterStateSync:
    """Keeps an ingress replica's ClusterState copy current and shares its speculative entries.

    Each sync is one call: it carries this router's speculative entries since the last one, and is a
    long poll (the actor answers when something new happened, or after `sync_wait_s`); the next one
    starts `sync_interval_s` later.
    """

    def __init__(
        self, app_name: str, state: ClusterState, config: ClusterStateConfig,
        on_live: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """`on_live`: told the live settings (app/config/live.py LiveState) set while serving, when they change."""
        self.state = state
        self._on_live = on_live
        self._live_version = 0
        self.live_in_force: dict[str, Any] | None = None
        """The live settings this router serves (restored to a restarted actor)."""
        self.args_digest = ""
        """Identifies the application's `args`: live settings belong to one version of them."""
        self.user_config_digest = ""
        self._restore: asyncio.Task[None] | None = None
        self._live_news: asyncio.Future[None] | None = None
        self.router_id = uuid.uuid4().hex[:12]
        self._config = config
        self._link = _ActorLink(app_name, config, f"router {self.router_id}")
        self._epoch = ""
        self._version = 0
        self._membership = -1
        self._stats_version = -1
        self._speculated: list[tuple[str, list[int]]] = []

    @property
    def live_version(self) -> int:
        """The version of the live settings this router has (from the actor)."""
        return self._live_version

    async def offer_live(self, user_config_digest: str, live: dict[str, Any]) -> dict[str, Any] | None:
        """This replica's settings (see ClusterStateActor.offer_live); returns those in force everywhere."""
        version, in_force = await self._link.actor().offer_live.remote(self.args_digest, user_config_digest, live)
        self._live_version = version
        if user_config_digest:
            self.user_config_digest = user_config_digest
        self.live_in_force = in_force
        return in_force

    async def _restore_live(self, live: dict[str, Any]) -> None:
        await self._link.actor().restore_live.remote(self.args_digest, self.user_config_digest, live)

    async def live_past(self, version: int) -> None:
        """Return once a sync has brought live settings other than `version`."""
        while self._live_version == version:
            if self._live_news is None or self._live_news.done():
                self._live_news = asyncio.get_running_loop().create_future()
            await self._live_news

    async def put_live(self, live: dict[str, Any], expected_version: int) -> bool:
        """A change made on top of version `expected_version`; False if another came first (sync, retry)."""
        put, version = await self._link.actor().set_live.remote(self.args_digest, expected_version, live)
        if put:
            self._live_version, self.live_in_force = version, live
        return put

    def speculated(self, replica_id: str, block_hashes: list[int]) -> None:
        if block_hashes:
            self._speculated.append((replica_id, block_hashes))

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once(wait_s=self._config.sync_wait_s)
                self._link.succeeded()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._link.failed(error)
            await asyncio.sleep(self._config.sync_interval_s)

    async def sync_once(self, wait_s: float = 0.0) -> None:
        speculated, self._speculated = self._speculated, []
        try:
            reply: SyncReply = await self._link.actor().sync.remote(
                self.router_id, self._epoch, self._version, self._membership, self._stats_version, wait_s,
                speculated, self._live_version,
            )
        except BaseException:
            self._speculated = speculated + self._speculated  # not delivered: send with the next sync
            raise
        self.apply(reply, time.monotonic())

    def apply(self, reply: SyncReply, now: float) -> None:
        state = self.state
        if reply.replicas is not None:
            state.retain(info.replica_id for info in reply.replicas)
            for info in reply.replicas:
                state.register(info)
        for replica_id, stats in reply.stats.items():
            state.update_stats(replica_id, stats, now)
        if reply.full_index is not None:
            for replica_id in state.index.replicas:
                state.index.clear(replica_id)
            for replica_id, hashes in reply.full_index.items():
                state.index.add(replica_id, hashes)
        for kind, replica_id, hashes in _runs(reply.ops):
            if kind == "store":
                state.index.add(replica_id, hashes)
            elif kind == "remove":
                state.index.remove(replica_id, hashes)
            elif kind == "clear":
                state.index.clear(replica_id)
            elif kind == "speculate":
                state.note_routed(replica_id, hashes, now)
        if self._epoch and reply.epoch != self._epoch and reply.live is None and self.live_in_force is not None:
            # The actor restarted and forgot the live settings: put back the ones in force here, so that
            # engine replicas started from now on load the adapters in force, not the config's.
            self._restore = asyncio.get_running_loop().create_task(self._restore_live(self.live_in_force))
            self._restore.add_done_callback(_said_if_failed)
        self._epoch, self._version = reply.epoch, reply.version
        self._membership, self._stats_version = reply.membership, reply.stats_version
        state.synced_at = now
        if reply.live is not None and self._on_live is not None:
            self._on_live(reply.live)
        self._live_version = reply.live_version
        if self._live_news is not None and not self._live_news.done():
            self._live_news.set_result(None)


def _said_if_failed(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("live settings not restored to the restarted state actor: %s (engine replicas started "
                       "from now on load the config's adapters until the next change)", task.exception())


def _runs(ops: list[IndexOp]) -> list[tuple[str, str, list[int]]]:
    """The ops with each replica's consecutive ops of one kind joined: the index pays per call, and a
    busy fleet sends hundreds of small ones a second. Each replica's own order is kept (a block stored
    then removed ends up removed); different replicas' ops do not interact."""
    runs: list[tuple[str, str, list[int]]] = []
    open_run: dict[str, int] = {}
    for op in ops:
        at = open_run.get(op.replica_id)
        if at is not None and runs[at][0] == op.kind and op.kind != "clear":
            runs[at][2].extend(op.hashes)
            continue
        open_run[op.replica_id] = len(runs)
        runs.append((op.kind, op.replica_id, list(op.hashes)))
    return runs
