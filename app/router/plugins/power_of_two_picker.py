"""Picker: the less loaded of two replicas drawn at random, then the rest by load (Serve's default)."""

from __future__ import annotations

import numpy as np

from app.router.fleet import FleetView
from app.router.plugins.base import FilterResult, NoParams, PluginContext, Ranking


class PowerOfTwoPicker:
    Params = NoParams

    def __init__(self, params: NoParams, context: PluginContext) -> None:
        self._rng = context.rng

    def rank(self, view: FleetView, filters: list[FilterResult], cost: np.ndarray | None) -> Ranking:
        states = view.fleet.states
        picks = self._rng.sample(range(len(states)), min(2, len(states)))
        picks.sort(key=lambda i: states[i].load)
        chosen = set(picks)
        rest = sorted((i for i in range(len(states)) if i not in chosen),
                      key=lambda i: (states[i].load, states[i].replica_id))
        return Ranking(order=picks + rest, reason="baseline")
