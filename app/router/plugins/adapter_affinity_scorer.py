"""Scorer: what it costs to run the request's LoRA adapter on each replica, in seconds of TTFT.

An adapter already in use on a replica (or idle in one of its slots, or sent there moments ago, before
the engine's stats could say so) costs nothing; one that must be loaded costs `load_s`, priced like
prefill so that it competes with load and prefix matches on one scale; loading it where the slots are
full of idle adapters also evicts one, which its next request must load again (`evict_s`); a replica
whose every slot serves running requests of other adapters also makes the request wait for a slot to
free (`busy_slots_s`). The load guard and the TTFT scorer keep one hot adapter from
piling onto one replica: once its queue outweighs a load elsewhere, the request goes elsewhere and
the adapter is loaded there too. Requests without an adapter cost nothing anywhere.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.protocol.engine import AdapterLoad
from app.router.fleet import FleetView
from app.router.plugins.base import PluginContext
from app.router.state import ReplicaState


class AdapterAffinityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    load_s: float = Field(default=0.05, ge=0.0, description="Seconds to load an adapter into a free slot.")
    evict_s: float = Field(
        default=0.5, ge=0.0,
        description="More seconds where the load evicts an idle adapter as popular as the request's (scaled by "
        "their popularity): the reloads an eviction causes later, which LRU slots turn into a cascade. Priced well "
        "above one load's time on purpose: in the simulator 0.5 s halves the loads of 0.05 s and lowers TTFT too "
        "(benchmarks/README.md, 'Many LoRA adapters').")
    sent_recently_s: float = Field(
        default=1.0, ge=0.0,
        description="How long an adapter this router sent to a replica counts as in a slot while the replica's "
        "stats do not show it yet (they lag by a report and a sync).")
    popularity_s: float = Field(
        default=30.0, gt=0.0, description="Half-life of the request counts that price an eviction by how popular "
        "the evicted adapter is.")
    busy_slots_s: float = Field(
        default=0.5, ge=0.0,
        description="More seconds where every slot serves running requests of other adapters (the request "
        "waits for one to finish).",
    )


class AdapterAffinityScorer:
    Params = AdapterAffinityParams

    def __init__(self, params: AdapterAffinityParams, context: PluginContext) -> None:
        self.params = params
        self._popularity: dict[str, tuple[float, float]] = {}
        """Adapter -> (decaying request count, when it was last brought up to date)."""

    def cost(self, view: FleetView) -> np.ndarray:
        adapter = view.request.adapter
        costs = np.zeros(len(view.fleet.ids), dtype=np.float64)
        if adapter is None:
            return costs
        self._observe(adapter, view.now)
        p = self.params
        for index, state in enumerate(view.fleet.states):
            adapters = state.stats.adapters
            if adapters is not None and (adapter in adapters.running or
                                         (adapters.loaded is not None and adapter in adapters.loaded)):
                # The stats show it: from here on they speak for it (an eviction will show there too).
                state.sent_adapters.pop(adapter, None)
                continue
            sent_at = state.sent_adapters.get(adapter)
            if sent_at is not None and view.now - sent_at <= p.sent_recently_s:
                continue  # sent moments ago; the stats have not caught up
            if adapters is None:
                costs[index] = p.load_s  # the engine says nothing of its slots: assume a load
            elif adapter in adapters.waiting:
                costs[index] = p.load_s
            elif len(set(adapters.running)) >= adapters.max_loras:
                costs[index] = p.load_s + p.busy_slots_s
            elif len(self._in_slots(state, adapters, view.now)) >= adapters.max_loras:
                costs[index] = p.load_s + p.evict_s * self._eviction_weight(view, state, adapters, adapter)
            else:
                costs[index] = p.load_s
        return costs

    def _observe(self, adapter: str, now: float) -> None:
        """Count the request in its adapter's popularity: a decaying request count (half-life `popularity_s`),
        decayed when read or counted, so a request costs the same however many adapters there are."""
        self._popularity[adapter] = (self._rate(adapter, now) + 1.0, now)

    def _rate(self, adapter: str, now: float) -> float:
        count, at = self._popularity.get(adapter, (0.0, now))
        return count * 0.5 ** (max(0.0, now - at) / self.params.popularity_s)

    def _eviction_weight(self, view: FleetView, state: ReplicaState, adapters: AdapterLoad, adapter: str) -> float:
        """How much evicting this replica's next victim costs, relative to `evict_s`: by the victim's popularity
        against the request's adapter's (1 when alike, up to 2 when the victim is much hotter, near 0 when much
        colder), so a load evicts where the adapter leaving is the least missed. 1 where the engine does not say
        which adapter goes next (vLLM does not list idle adapters)."""
        if adapters.loaded is None:
            return 1.0
        busy = {*adapters.running, *(n for n, at in state.sent_adapters.items()
                                     if view.now - at <= self.params.sent_recently_s)}
        victim = next((name for name in adapters.loaded if name not in busy), None)  # least recently used first
        if victim is None:
            return 1.0
        victim_rate, rate = self._rate(victim, view.now), self._rate(adapter, view.now)
        return 2.0 * victim_rate / (victim_rate + rate) if victim_rate + rate > 0 else 1.0

    def _in_slots(self, state: ReplicaState, adapters: AdapterLoad, now: float) -> set[str]:
        """The adapters a replica's slots hold: what its stats say, and what was sent there since."""
        held = set(adapters.loaded if adapters.loaded is not None else adapters.running)
        window = self.params.sent_recently_s
        return held | {name for name, sent_at in state.sent_adapters.items() if now - sent_at <= window}
