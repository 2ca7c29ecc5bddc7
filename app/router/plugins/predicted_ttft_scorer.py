"""Scorer: the request's predicted time to first token on each replica, in seconds.

The prefill ahead of it (this router's pending prefills, or the engine's waiting requests at the
running mean prompt), its own uncached tokens, the batch it joins and the queue beyond max_num_seqs,
through the online-calibrated TTFT model (app/router/cost.py). Records its prediction on the view, so
the decision reports it and the model learns from the TTFT observed.
"""

from __future__ import annotations

import numpy as np

from app.router.fleet import FleetView
from app.router.plugins.base import NoParams, PluginContext


class PredictedTTFTScorer:
    Params = NoParams

    def __init__(self, params: NoParams, context: PluginContext) -> None:
        self.model = context.ttft_model

    def cost(self, view: FleetView) -> np.ndarray:
        load = view.load
        ahead = np.maximum(view.pending_prefill_tokens, view.waiting * view.avg_uncached_tokens)
        prefill = ahead + view.uncached
        queued = np.maximum(load - view.fleet.batch_capacity, 0.0)
        ttft = self.model.predict_many(prefill, load, queued)
        view.predicted_ttft = ttft
        view.ttft_inputs = (prefill, load, queued)
        return ttft
