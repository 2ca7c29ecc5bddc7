"""Scorer: the prefill time of the prefix tokens a replica would duplicate from the best holder.

A copy of a prefix another replica already holds wastes that compute and evicts something else where
it lands. Seconds.
"""

from __future__ import annotations

import numpy as np

from app.router.fleet import FleetView
from app.router.plugins.base import NoParams, PluginContext


class PrefixDuplicationScorer:
    Params = NoParams

    def __init__(self, params: NoParams, context: PluginContext) -> None:
        self.model = context.ttft_model

    def cost(self, view: FleetView) -> np.ndarray:
        matched = view.matched
        return self.model.miss_seconds(matched.max() - matched)
