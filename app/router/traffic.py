"""Weighted traffic splits: a served name whose requests go to several targets (base models or adapters)
in set proportions, optionally sticky per caller, changeable while serving.

Without stickiness, targets follow their weights exactly in every window (smooth weighted round-robin,
as nginx spreads weighted upstreams), so a 90/10 split is 90/10 over any 100 requests, not just on
average. A sticky split hashes the caller's key (a header, or the `user` field) onto the weights, so
one caller stays on one target while the weights hold. Plain data; no Ray, no HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrafficTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1, description="A served model or adapter name.")
    weight: float = Field(ge=0.0, description="Its share, relative to the split's other weights.")


class TrafficSplit(BaseModel):
    """One served name and where its requests go."""

    model_config = ConfigDict(extra="forbid")

    targets: list[TrafficTarget] = Field(min_length=1)
    sticky_header: str | None = Field(
        default=None, description="A request header (e.g. x-session-id) whose value keeps a caller on one target.")
    sticky_user: bool = Field(default=False, description="Keep callers on one target by the body's `user` field.")

    @model_validator(mode="after")
    def _weights_positive(self) -> TrafficSplit:
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("the weights must add up to more than 0")
        names = [t.target for t in self.targets]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ValueError(f"target {duplicate!r} is listed twice")
        return self

    @property
    def weights(self) -> dict[str, float]:
        return {t.target: t.weight for t in self.targets}


class TrafficError(ValueError):
    """A split that cannot be served (refused as a whole; the splits in force stay)."""


def check_splits(splits: Mapping[str, TrafficSplit], served: Iterable[str]) -> None:
    """Raise TrafficError if a split names an unknown target or takes a name already served."""
    known = set(served)
    for name, split in splits.items():
        if name in known:
            raise TrafficError(f"traffic split {name!r} takes the name of a served model; give it a name of its own")
        for target in split.targets:
            if target.target in splits:
                raise TrafficError(f"traffic split {name!r}: target {target.target!r} is a split itself; name a "
                                   "model or adapter")
            if target.target not in known:
                raise TrafficError(f"traffic split {name!r}: unknown target {target.target!r}; served: "
                                   f"{', '.join(sorted(known))}")


class _Rotation:
    """Smooth weighted round-robin over one split's targets."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = {target: weight for target, weight in weights.items() if weight > 0}
        self.total = sum(self.weights.values())
        self._current = dict.fromkeys(self.weights, 0.0)

    def next(self) -> str:
        for target, weight in self.weights.items():
            self._current[target] += weight
        best = max(self._current, key=self._current.__getitem__)
        self._current[best] -= self.total
        return best

    def by_key(self, key: str) -> str:
        point = xxhash.xxh3_64_intdigest(key.encode()) / 2**64 * self.total
        for target, weight in self.weights.items():
            point -= weight
            if point < 0:
                return target
        return next(reversed(self.weights))


class TrafficSplitter:
    """Picks a target for requests to split names; the rest pass untouched."""

    def __init__(self, splits: Mapping[str, TrafficSplit] | None = None) -> None:
        self.splits = dict(splits or {})
        self._rotations = {name: _Rotation(split.weights) for name, split in self.splits.items()}
        self.sticky_headers = frozenset(s.sticky_header.lower() for s in self.splits.values() if s.sticky_header)
        self.sticky_header_bytes = frozenset(name.encode("latin-1") for name in self.sticky_headers)
        """The same names as ASGI spells headers, so a request's headers are matched without decoding them all."""

    def pick(self, name: str, *, user: str | None = None, headers: Mapping[str, str] | None = None) -> str | None:
        """The target for a request to `name`, or None when `name` is not a split."""
        split = self.splits.get(name)
        if split is None:
            return None
        rotation = self._rotations[name]
        key = None
        if split.sticky_header and headers:
            key = headers.get(split.sticky_header.lower())
        if key is None and split.sticky_user and user:
            key = user
        return rotation.by_key(f"{name}\x00{key}") if key else rotation.next()
