"""Picker: the lowest weighted cost among the replicas every filter kept, with a deterministic tie-break.

Costs within `tie_quantum_s` of each other count as equal and are ordered by rendezvous hashing of
the prompt's last block with each replica id, so two ingress replicas with the same state pick the
same replica and an idle fleet still spreads distinct prompts evenly. Replicas a filter left out
follow, the ones the earliest filters kept first: the ranking is total, so a failover always has a
next replica.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.router.fleet import FleetView
from app.router.plugins.base import FilterResult, PluginContext, Ranking

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def rendezvous(key: int, id_hashes: np.ndarray) -> np.ndarray:
    """splitmix64 of (replica id hash xor the prompt's key): a stable, uniform score per replica."""
    z = id_hashes ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


class LowestCostParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tie_quantum_s: float = Field(default=0.001, ge=0, description="Costs this close count as equal.")


class LowestCostPicker:
    Params = LowestCostParams

    def __init__(self, params: LowestCostParams, context: PluginContext) -> None:
        self.quantum = params.tie_quantum_s or 1e-12

    def rank(self, view: FleetView, filters: list[FilterResult], cost: np.ndarray | None) -> Ranking:
        request = view.request
        key = request.block_hashes[-1] if request.block_hashes else request.num_prompt_tokens
        tiebreak = rendezvous(key, view.fleet.id_hashes)
        quantized = (
            np.floor(cost / self.quantum).astype(np.int64) if cost is not None else np.zeros(len(view), np.int64)
        )
        # np.lexsort's last key is the most significant: kept by every filter, then by all but the last...
        kept = [~result.kept for result in filters]
        keys = (tiebreak, quantized)
        order = np.lexsort((*keys, *kept))
        best = int(order[0])
        return Ranking(order=order.tolist(), reason=self._reason(view, filters, keys, kept, best))

    @staticmethod
    def _reason(
        view: FleetView, filters: list[FilterResult], keys: tuple[np.ndarray, ...], kept: list[np.ndarray],
        best: int,
    ) -> str:
        if not view.fresh:
            return "stale_state"
        for result in filters:
            if result.bypassed and result.filter.bypass_reason:
                return result.filter.bypass_reason
        for k, result in enumerate(filters):
            if result.filter.moved_reason is None:
                continue
            # The choice without this filter (the earlier ones still apply): did the filter move it?
            without = int(np.lexsort((*keys, *kept[:k]))[0])
            if without != best and not result.mask[without]:
                return result.filter.moved_reason
        matched = view.matched
        if matched.max() <= 0:
            return "no_prefix"
        return "prefix" if matched[best] >= matched.max() else "load"
