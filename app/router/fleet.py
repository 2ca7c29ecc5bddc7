"""One routing decision's candidates as arrays: what every plugin of the pipeline reads.

`Fleet` holds what does not change between decisions (ids, block sizes, batch capacities), rebuilt
only when membership changes; `FleetView` adds one request's signals, computed once and shared by the
filters, scorers and picker, so a plugin costs one vectorised expression over the whole fleet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import xxhash

from app.router.state import ReplicaRole, ReplicaState


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    model: str
    block_hashes: Sequence[int]
    num_prompt_tokens: int
    block_size: int
    roles: tuple[ReplicaRole, ...] = ("mixed",)
    adapter: str | None = None
    """The LoRA adapter the request runs with (None: the base model)."""


@dataclass(slots=True)
class Fleet:
    """The candidates for one (model, roles), with what does not change between decisions."""

    version: int
    states: list[ReplicaState]
    ids: list[str]
    bits: np.ndarray
    block_sizes: np.ndarray
    id_hashes: np.ndarray
    batch_capacity: np.ndarray
    """Each engine's max_num_seqs (infinite where unknown)."""
    everyone: np.ndarray
    """All True, one per replica (read-only): the mask of a filter that keeps everyone."""

    @classmethod
    def of(cls, states: list[ReplicaState], bit_of: Callable[[str], int | None], version: int) -> Fleet:
        states = sorted(states, key=lambda s: s.replica_id)
        ids = [s.replica_id for s in states]
        return cls(
            version=version,
            states=states,
            ids=ids,
            bits=np.array([bit_of(i) for i in ids], dtype=np.int64),
            block_sizes=np.array([s.info.block_size for s in states], dtype=np.int64),
            id_hashes=np.array([xxhash.xxh3_64_intdigest(i.encode()) for i in ids], dtype=np.uint64),
            batch_capacity=np.array([s.info.max_num_seqs or np.inf for s in states], dtype=np.float64),
            everyone=_read_only(np.ones(len(states), dtype=bool)),
        )


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class FleetView:
    """A request and the fleet's signals for it, one entry per candidate (aligned with `fleet.ids`)."""

    def __init__(
        self, request: RoutingRequest, fleet: Fleet, blocks: np.ndarray, *, fresh: bool, avg_uncached_tokens: float,
        now: float = 0.0,
    ) -> None:
        self.request = request
        self.now = now
        """The router's clock at this decision."""
        self.fleet = fleet
        self.blocks = blocks
        """Leading prompt blocks each candidate holds (or was just sent)."""
        self.fresh = fresh
        """Whether the stats are recent enough to trust; stale views carry no prefix matches."""
        self.avg_uncached_tokens = avg_uncached_tokens
        """A running mean of the tokens requests prefill, to price requests waiting in an engine."""
        self.predicted_ttft: np.ndarray | None = None
        """Set by a scorer that predicts TTFT, so the decision can report and learn from it."""
        self.ttft_inputs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        """The cost model's inputs (prefill tokens, load, queued) behind `predicted_ttft`."""

    def __len__(self) -> int:
        return len(self.fleet.states)

    @cached_property
    def _signals(self) -> np.ndarray:
        # Runs per replica per decision: attributes read once each, ReplicaState.load inlined.
        rows = []
        for s in self.fleet.states:
            stats = s.stats
            waiting = stats.num_requests_waiting
            reported = stats.num_requests_running + waiting
            inflight = s.inflight
            rows.append((reported if reported > inflight else inflight, s.pending_prefill_tokens, waiting,
                         stats.kv_cache_usage_perc))
        return np.array(rows, dtype=np.float64).reshape(len(rows), 4).T

    @property
    def load(self) -> np.ndarray:
        """Running plus waiting requests, or this router's own in-flight count if larger (ReplicaState.load)."""
        return self._signals[0]

    @property
    def pending_prefill_tokens(self) -> np.ndarray:
        """Uncached prompt tokens this router sent that have no first token yet."""
        return self._signals[1]

    @property
    def waiting(self) -> np.ndarray:
        return self._signals[2]

    @property
    def kv_usage(self) -> np.ndarray:
        return self._signals[3]

    @cached_property
    def matched(self) -> np.ndarray:
        """Prompt tokens each candidate would not prefill (vLLM always recomputes the last one)."""
        prompt = self.request.num_prompt_tokens
        return np.minimum(self.blocks * self.request.block_size, max(prompt - 1, 0)).astype(np.float64)

    @cached_property
    def uncached(self) -> np.ndarray:
        return self.request.num_prompt_tokens - self.matched
