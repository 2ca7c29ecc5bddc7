"""Routing plugins by the names a routing profile uses.

Adding a plugin: its own module in this folder and one line in the table of its kind below (or, from
outside the package, one `register_*` call before the config is read).
"""

from __future__ import annotations

from typing import Any

from app.router.plugins.adapter_affinity_scorer import AdapterAffinityScorer
from app.router.plugins.base import Filter, Picker, Scorer
from app.router.plugins.kv_saturation_filter import KVSaturationFilter
from app.router.plugins.load_guard_filter import LoadGuardFilter
from app.router.plugins.lowest_cost_picker import LowestCostPicker
from app.router.plugins.miss_externality_scorer import MissExternalityScorer
from app.router.plugins.power_of_two_picker import PowerOfTwoPicker
from app.router.plugins.predicted_ttft_scorer import PredictedTTFTScorer
from app.router.plugins.prefix_duplication_scorer import PrefixDuplicationScorer
from app.router.plugins.round_robin_picker import RoundRobinPicker

FILTERS: dict[str, type[Filter]] = {
    "kv_saturation": KVSaturationFilter,
    "load_guard": LoadGuardFilter,
}
SCORERS: dict[str, type[Scorer]] = {
    "predicted_ttft": PredictedTTFTScorer,
    "miss_externality": MissExternalityScorer,
    "prefix_duplication": PrefixDuplicationScorer,
    "adapter_affinity": AdapterAffinityScorer,
}
PICKERS: dict[str, type[Picker]] = {
    "lowest_cost": LowestCostPicker,
    "round_robin": RoundRobinPicker,
    "power_of_two": PowerOfTwoPicker,
}
KINDS: dict[str, dict[str, type]] = {"filter": FILTERS, "scorer": SCORERS, "picker": PICKERS}


def add_to_table(table: dict[str, Any], kind: str, name: str, plugin: type) -> None:
    """Register a plugin under a name not taken by another (the same plugin again is a no-op)."""
    if table.get(name, plugin) is not plugin:
        raise ValueError(f"a {kind} named {name!r} is already registered")
    table[name] = plugin


def _register(kind: str, name: str, plugin: type) -> None:
    add_to_table(KINDS[kind], kind, name, plugin)


def register_filter(name: str, plugin: type[Filter]) -> None:
    _register("filter", name, plugin)


def register_scorer(name: str, plugin: type[Scorer]) -> None:
    _register("scorer", name, plugin)


def register_picker(name: str, plugin: type[Picker]) -> None:
    _register("picker", name, plugin)
