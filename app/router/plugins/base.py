"""The three kinds of routing plugin and what they are given.

A filter returns a mask over the fleet (True: the replica may take the request), a scorer a cost per
replica (seconds of predicted TTFT, or a normalised score in [0, 1] whose weight says what a whole
point is worth in seconds; lower is better either way), and a picker turns the masks and the weighted
cost into a total ranking. Each works on the whole fleet at once (numpy arrays in a FleetView), keeps
no state beyond what it is given here (a rotating picker keeps its position), and has a pydantic
`Params` model: its settings in the routing config, strictly checked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from app.router.cost import TTFTModel
from app.router.fleet import FleetView


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(slots=True)
class PluginContext:
    """What plugins share with the scheduler that runs them."""

    ttft_model: TTFTModel
    """The online-calibrated TTFT model (app/router/cost.py)."""
    rng: random.Random
    """The scheduler's seeded randomness, for pickers that sample."""


class Filter(Protocol):
    Params: ClassVar[type[BaseModel]]
    bypass_reason: ClassVar[str | None]
    """The decision's reason when the filter would leave no replica and is set aside (None: no reason)."""
    moved_reason: ClassVar[str | None]
    """The decision's reason when the filter moved the choice off the otherwise best replica."""

    def __init__(self, params: BaseModel, context: PluginContext) -> None: ...

    def mask(self, view: FleetView, passed: np.ndarray) -> np.ndarray:
        """True where the replica may take the request; `passed` is what the earlier filters left."""
        ...


class Scorer(Protocol):
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: BaseModel, context: PluginContext) -> None: ...

    def cost(self, view: FleetView) -> np.ndarray:
        """A cost per replica, lower is better."""
        ...


@dataclass(slots=True)
class Ranking:
    """A picker's answer: candidate indices in order of preference, and why the first one."""

    order: list[int]
    reason: str


@dataclass(slots=True)
class FilterResult:
    mask: np.ndarray
    """The filter's own answer (all True when it was set aside)."""
    kept: np.ndarray
    """What this filter and every earlier one kept."""
    filter: Filter
    bypassed: bool


class Picker(Protocol):
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: BaseModel, context: PluginContext) -> None: ...

    def rank(self, view: FleetView, filters: list[FilterResult], cost: np.ndarray | None) -> Ranking:
        """Every candidate, in order; replicas a filter left out go after those it kept, never away.
        `cost` is None when the profile has no scorers."""
        ...
