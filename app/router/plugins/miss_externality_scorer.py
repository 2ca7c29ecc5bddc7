"""Scorer: the delay the request's uncached prefill imposes on the requests already on each replica.

A request's own TTFT is not the whole price of sending it somewhere: its prefill also stalls every
request already there (their decode steps share the batch, queued ones start later), so the cost is
their count x the miss's prefill time. Without it a busy fleet spreads each prefix group over every
replica, hit rates fall, prefill work grows and queues grow further. Seconds.
"""

from __future__ import annotations

import numpy as np

from app.router.fleet import FleetView
from app.router.plugins.base import NoParams, PluginContext


class MissExternalityScorer:
    Params = NoParams

    def __init__(self, params: NoParams, context: PluginContext) -> None:
        self.model = context.ttft_model

    def cost(self, view: FleetView) -> np.ndarray:
        return self.model.miss_seconds(view.uncached) * view.load
