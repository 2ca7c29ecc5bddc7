"""Small fleets for plugin tests: a FleetView built from per-replica numbers."""

from __future__ import annotations

import random

import numpy as np

from app.protocol.engine import AdapterLoad
from app.router.cost import TTFTModel
from app.router.fleet import Fleet, FleetView, RoutingRequest
from app.router.plugins.base import PluginContext
from app.router.state import ReplicaInfo, ReplicaState, ReplicaStats

BLOCK = 16


def make_view(
    *,
    running: list[int],
    waiting: list[int] | None = None,
    kv_usage: list[float] | None = None,
    blocks: list[int] | None = None,
    prompt_blocks: int = 8,
    fresh: bool = True,
    adapters: list[AdapterLoad | None] | None = None,
    adapter: str | None = None,
) -> FleetView:
    n = len(running)
    states = [
        ReplicaState(
            info=ReplicaInfo(replica_id=f"r{i}", model="m", block_size=BLOCK, num_gpu_blocks=1024),
            stats=ReplicaStats(num_requests_running=running[i], num_requests_waiting=(waiting or [0] * n)[i],
                               kv_cache_usage_perc=(kv_usage or [0.0] * n)[i],
                               adapters=(adapters or [None] * n)[i]),
        )
        for i in range(n)
    ]
    fleet = Fleet.of(states, lambda rid: int(rid[1:]), version=0)
    request = RoutingRequest("m", list(range(1, prompt_blocks + 1)), prompt_blocks * BLOCK + 3, BLOCK,
                             adapter=adapter)
    held = np.array(blocks or [0] * n, dtype=np.int64)
    return FleetView(request, fleet, held, fresh=fresh, avg_uncached_tokens=512.0)


def context(seed: int = 0) -> PluginContext:
    return PluginContext(TTFTModel(), random.Random(seed))
