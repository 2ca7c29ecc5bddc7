"""Filter: skip a replica whose KV cache is full and has a queue, while others are not.

At the default 1.0 only a replica with every block in use is skipped: a lower threshold sends requests
away from the replicas that hold their prefix whenever caches run full, which is exactly when misses
hurt most (benchmarks/README.md); the cost model already prices the queue.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.router.fleet import FleetView
from app.router.plugins.base import PluginContext


class KVSaturationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    saturated_kv_usage: float = Field(default=1.0, gt=0, le=1, description="KV usage (0..1) that counts as full.")


class KVSaturationFilter:
    Params = KVSaturationParams
    bypass_reason = "all_saturated"
    moved_reason = None

    def __init__(self, params: KVSaturationParams, context: PluginContext) -> None:
        self.threshold = params.saturated_kv_usage

    def mask(self, view: FleetView, passed: np.ndarray) -> np.ndarray:
        # Stale stats say nothing about saturation now.
        saturated = view.fresh & (view.kv_usage >= self.threshold) & (view.waiting > 0)
        return ~saturated
