"""Model resolution: which served model a request's `model` field names.

Served names and aliases map to one canonical model. Plain data, no Ray, no HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class UnknownModelError(LookupError):
    """The requested model name is neither a served name nor an alias."""

    def __init__(self, requested: str, available: list[str]) -> None:
        super().__init__(requested)
        self.requested = requested
        self.available = available


@dataclass(frozen=True)
class ModelEntry:
    name: str
    aliases: tuple[str, ...] = ()


class ModelRegistry:
    """Resolves served model names and aliases to canonical model names."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self._canonical: dict[str, str] = {}
        self._names: list[str] = []
        for entry in entries:
            for key in (entry.name, *entry.aliases):
                if key in self._canonical:
                    raise ValueError(f"model name or alias {key!r} is used twice")
                self._canonical[key] = entry.name
            self._names.append(entry.name)

    @property
    def names(self) -> list[str]:
        """Canonical served names, in configuration order."""
        return list(self._names)

    def resolve(self, requested: str) -> str:
        try:
            return self._canonical[requested]
        except KeyError:
            raise UnknownModelError(requested, self.names) from None
