"""Picker: each request starts one replica further along the fleet (a load-only baseline)."""

from __future__ import annotations

import numpy as np

from app.router.fleet import FleetView
from app.router.plugins.base import FilterResult, NoParams, PluginContext, Ranking


class RoundRobinPicker:
    Params = NoParams

    def __init__(self, params: NoParams, context: PluginContext) -> None:
        self._next = 0

    def rank(self, view: FleetView, filters: list[FilterResult], cost: np.ndarray | None) -> Ranking:
        n = len(view)
        start = self._next % n
        self._next += 1
        return Ranking(order=[*range(start, n), *range(start)], reason="baseline")
