"""Filter: no replica carries more than `load_ratio` x the least-loaded one's load + `load_slack`.

A backstop for a wrong cost model (a hot prefix, a stale fit), not the load balancer: each request it
moves recomputes its whole prefix, so a tight guard turns ordinary Poisson bursts into cache misses
(benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.router.fleet import FleetView
from app.router.plugins.base import PluginContext


class LoadGuardParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    load_ratio: float = Field(default=3.0, ge=1.0, description="Multiple of the least-loaded replica's load...")
    load_slack: int = Field(default=16, ge=0, description="...plus this many requests.")


class LoadGuardFilter:
    Params = LoadGuardParams
    bypass_reason = None
    moved_reason = "guard"

    def __init__(self, params: LoadGuardParams, context: PluginContext) -> None:
        self.ratio = params.load_ratio
        self.slack = params.load_slack

    def mask(self, view: FleetView, passed: np.ndarray) -> np.ndarray:
        # Relative to the replicas still in play: a saturated idle-looking replica sets no bar.
        load = view.load
        return load <= self.ratio * load[passed].min() + self.slack
