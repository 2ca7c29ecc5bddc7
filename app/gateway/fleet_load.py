"""What admission stages see of a model's fleet: the router's cluster state and the gateway's queues."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from app.router.admission import ModelLoad
from app.router.state import ClusterState


class ClusterFleetLoad:
    """ModelLoad from this ingress replica's copy of the cluster state, computed when a stage asks."""

    def __init__(self, cluster: ClusterState, queued: Mapping[str, Callable[[], int]] | None = None) -> None:
        """`queued`: by model, how many of its requests wait at this ingress for an engine with room."""
        self._cluster = cluster
        self._queued = dict(queued or {})

    def watch_queue(self, model: str, queued: Callable[[], int]) -> None:
        self._queued[model] = queued

    def of(self, model: str) -> ModelLoad:
        replicas = [s for s in self._cluster.replicas.values() if s.info.model == model]
        queued = self._queued.get(model)
        return ModelLoad(
            replicas=len(replicas),
            running=sum(s.stats.num_requests_running for s in replicas),
            waiting=sum(s.stats.num_requests_waiting for s in replicas),
            inflight=sum(s.inflight for s in replicas),
            queued=queued() if queued is not None else 0,
            kv_cache_usage=sum(s.stats.kv_cache_usage_perc for s in replicas) / len(replicas) if replicas else 0.0,
            fresh=self._cluster.is_fresh(time.monotonic()),
        )
