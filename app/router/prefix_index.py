"""Which replicas hold which prefix-cache blocks: block hash -> set of replicas.

One open-addressing hash table in numpy arrays, so an entry costs a few dozen bytes instead of the
hundred-plus that a dict of Python ints would (measured in benchmarks/README.md): a 64-bit key, one
bit per replica, and a recency stamp. A prompt's lookup is a handful of vectorized probes, and its
per-replica prefix length is a cumulative AND over the blocks' replica bits.

Each replica's entries are capped at its engine's cache size in blocks; when an insert goes over,
the least recently touched blocks of that replica are dropped (recency is per block, shared by all
replicas that hold it, which approximates each engine's own LRU).

`SpeculativeEntries` holds the guesses made at routing time, before an engine's KV events confirm
them: they expire after a TTL so a request that never ran cannot attract traffic forever.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

_EMPTY = np.uint64(0)
_TOMBSTONE = np.uint64(1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MAX_LOAD = 0.5
_EVICT_TO = 0.95  # evict a little below the cap so a full replica does not rescan on every insert


def _normalize(hashes: Iterable[int]) -> np.ndarray:
    try:
        keys = np.asarray(hashes, dtype=np.uint64)  # block hashes are unsigned 64-bit: one C call
    except (OverflowError, TypeError, ValueError):
        keys = np.fromiter((h & 0xFFFFFFFFFFFFFFFF for h in hashes), dtype=np.uint64)
    # 0 and 1 mark empty and deleted slots; shift those two keys out of the way.
    return np.where(keys < 2, keys + np.uint64(2), keys)


class PrefixIndex:
    def __init__(self, initial_capacity: int = 1024) -> None:
        self._bits: dict[str, int] = {}
        self._free_bits: list[int] = []
        self._count: list[int] = []
        self._limit: list[int] = []
        self._tick = 0
        self._allocate(max(16, 1 << (initial_capacity - 1).bit_length()), words=1)

    # -- replicas ------------------------------------------------------------------------------

    def add_replica(self, replica_id: str, capacity_blocks: int) -> None:
        """Track a replica whose engine caches at most `capacity_blocks` blocks."""
        if replica_id in self._bits:
            self._limit[self._bits[replica_id]] = max(1, capacity_blocks)
            return
        if self._free_bits:
            bit = self._free_bits.pop()
        else:
            bit = len(self._count)
            self._count.append(0)
            self._limit.append(0)
            if bit >= self._masks.shape[1] * 64:
                self._masks = np.hstack([self._masks, np.zeros_like(self._masks)])
        self._bits[replica_id] = bit
        self._count[bit] = 0
        self._limit[bit] = max(1, capacity_blocks)

    def remove_replica(self, replica_id: str) -> None:
        if replica_id not in self._bits:
            return
        self.clear(replica_id)
        self._free_bits.append(self._bits.pop(replica_id))

    @property
    def replicas(self) -> list[str]:
        return list(self._bits)

    def num_blocks(self, replica_id: str) -> int:
        bit = self._bits.get(replica_id)
        return 0 if bit is None else self._count[bit]

    # -- updates -------------------------------------------------------------------------------

    def add(self, replica_id: str, hashes: Sequence[int]) -> int:
        """Record that the replica holds these blocks; returns how many were new to it."""
        bit = self._bits.get(replica_id)
        if bit is None or not hashes:
            return 0
        keys = np.unique(_normalize(hashes))
        slots = self._find(keys)
        missing = slots < 0
        if missing.any():
            if self._used + int(missing.sum()) > _MAX_LOAD * self._capacity:
                self._grow(self._live + int(missing.sum()))
                slots = self._find(keys)
                missing = slots < 0
            slots[missing] = self._place(keys[missing])
        word, mask = bit >> 6, np.uint64(1 << (bit & 63))
        column = self._masks[slots, word]
        new = (column & mask) == 0
        self._masks[slots[new], word] = column[new] | mask
        self._tick += 1
        self._stamp[slots] = self._tick
        added = int(new.sum())
        self._count[bit] += added
        if self._count[bit] > self._limit[bit]:
            self._evict(bit, self._count[bit] - int(self._limit[bit] * _EVICT_TO))
        return added

    def remove(self, replica_id: str, hashes: Sequence[int]) -> int:
        """Record that the replica evicted these blocks; returns how many it was known to hold."""
        bit = self._bits.get(replica_id)
        if bit is None or not hashes:
            return 0
        slots = self._find(np.unique(_normalize(hashes)))
        return self._clear_bit(bit, slots[slots >= 0])

    def clear(self, replica_id: str) -> None:
        bit = self._bits.get(replica_id)
        if bit is None:
            return
        word, mask = bit >> 6, np.uint64(1 << (bit & 63))
        self._clear_bit(bit, np.nonzero(self._masks[:, word] & mask)[0])
        self._count[bit] = 0

    # -- queries -------------------------------------------------------------------------------

    def block_rows(self, hashes: Sequence[int]) -> np.ndarray:
        """Replica bit rows of each block, in prompt order (zeros for unknown blocks)."""
        slots = self._find(_normalize(hashes))
        rows = np.zeros((len(slots), self._masks.shape[1]), dtype=np.uint64)
        found = slots >= 0
        rows[found] = self._masks[slots[found]]
        return rows

    def match(self, hashes: Sequence[int], extra_rows: np.ndarray | None = None) -> dict[str, int]:
        """Per replica, how many leading blocks of the prompt it holds (replicas with none omitted).

        `extra_rows` (same shape as `block_rows`) adds replica bits from elsewhere, e.g. speculation.
        """
        counts = self.match_counts(hashes, extra_rows)
        if counts is None:
            return {}
        return {rid: int(counts[bit]) for rid, bit in self._bits.items() if counts[bit]}

    def match_counts(self, hashes: Sequence[int], extra_rows: np.ndarray | None = None) -> np.ndarray | None:
        """`match` as leading-block counts indexed by replica bit; None when no replica holds block 0."""
        if not hashes:
            return None
        rows = self.block_rows(hashes)
        if extra_rows is not None:
            rows |= extra_rows[:, : rows.shape[1]]
        if not rows[0].any():
            return None
        held = np.bitwise_and.accumulate(rows, axis=0)
        # A prefix ends at the first block a replica lacks, so only the rows up to the last
        # non-empty one matter; cutting there keeps long unmatched tails cheap.
        held = held[: np.flatnonzero(held.any(axis=1))[-1] + 1]
        return np.unpackbits(held.view(np.uint8), axis=1, bitorder="little").sum(axis=0)

    def bit_of(self, replica_id: str) -> int | None:
        return self._bits.get(replica_id)

    @property
    def words(self) -> int:
        return self._masks.shape[1]

    @property
    def num_keys(self) -> int:
        """Distinct blocks held by at least one replica."""
        return self._live

    def entries(self) -> int:
        """(block, replica) pairs held."""
        return sum(self._count[bit] for bit in self._bits.values())

    def nbytes(self) -> int:
        return self._keys.nbytes + self._masks.nbytes + self._stamp.nbytes

    def dump(self) -> dict[str, list[int]]:
        """Every replica's blocks, for a full snapshot."""
        live = np.nonzero(self._keys > _TOMBSTONE)[0]
        out: dict[str, list[int]] = {}
        for rid, bit in self._bits.items():
            word, mask = bit >> 6, np.uint64(1 << (bit & 63))
            held = live[(self._masks[live, word] & mask) != 0]
            out[rid] = [int(k) for k in self._keys[held]]
        return out

    # -- table internals ------------------------------------------------------------------------

    def _allocate(self, capacity: int, words: int) -> None:
        self._capacity = capacity
        self._shift = np.uint64(64 - (capacity.bit_length() - 1))
        self._keys = np.zeros(capacity, dtype=np.uint64)
        self._masks = np.zeros((capacity, words), dtype=np.uint64)
        self._stamp = np.zeros(capacity, dtype=np.uint32)
        self._used = 0  # live + tombstones
        self._live = 0

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * _GOLDEN) >> self._shift).astype(np.int64)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where absent."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if not len(keys):
            return out
        index = np.arange(len(keys))
        pos = self._home(keys)
        wanted = keys
        top = self._capacity - 1
        while index.size:
            current = self._keys[pos]
            hit = current == wanted
            out[index[hit]] = pos[hit]
            probe_on = ~hit & (current != _EMPTY)
            index, wanted, pos = index[probe_on], wanted[probe_on], (pos[probe_on] + 1) & top
        return out

    def _place(self, keys: np.ndarray) -> np.ndarray:
        """Insert keys known to be absent and unique; returns their slots."""
        out = np.empty(len(keys), dtype=np.int64)
        index = np.arange(len(keys))
        pos = self._home(keys)
        top = self._capacity - 1
        while index.size:
            current = self._keys[pos]
            free = (current == _EMPTY) | (current == _TOMBSTONE)
            # Two keys can land on the same free slot in one round: the first takes it.
            free_pos = pos[free]
            taken, first = np.unique(free_pos, return_index=True)
            winners = np.nonzero(free)[0][first]
            self._used += int((self._keys[taken] == _EMPTY).sum())
            self._keys[taken] = keys[index[winners]]
            self._masks[taken] = 0
            out[index[winners]] = taken
            self._live += len(taken)
            retry = np.ones(index.size, dtype=bool)
            retry[winners] = False
            index, pos = index[retry], (pos[retry] + 1) & top
        return out

    def _grow(self, live_needed: int) -> None:
        capacity = self._capacity
        while live_needed > 0.35 * capacity:
            capacity *= 2
        live = np.nonzero(self._keys > _TOMBSTONE)[0]
        keys, masks, stamps = self._keys[live], self._masks[live], self._stamp[live]
        self._allocate(capacity, self._masks.shape[1])
        slots = self._place(keys)
        self._masks[slots] = masks
        self._stamp[slots] = stamps

    def _clear_bit(self, bit: int, slots: np.ndarray) -> int:
        word, mask = bit >> 6, np.uint64(1 << (bit & 63))
        column = self._masks[slots, word]
        held = slots[(column & mask) != 0]
        if not held.size:
            return 0
        self._masks[held, word] &= ~mask
        self._count[bit] -= int(held.size)
        empty = held[~self._masks[held].any(axis=1)]
        self._keys[empty] = _TOMBSTONE
        self._live -= int(empty.size)
        return int(held.size)

    def _evict(self, bit: int, how_many: int) -> None:
        word, mask = bit >> 6, np.uint64(1 << (bit & 63))
        held = np.nonzero(self._masks[:, word] & mask)[0]
        if how_many >= held.size:
            self._clear_bit(bit, held)
            return
        oldest = held[np.argpartition(self._stamp[held], how_many)[:how_many]]
        self._clear_bit(bit, oldest)


class SpeculativeEntries:
    """Blocks a replica is assumed to hold because a request was just routed there.

    Kept apart from the index so that each guess can expire: engines that publish KV events
    confirm real blocks within milliseconds, and a guess nobody confirms is dropped after `ttl_s`.
    Holders are kept per block as one int of the index's replica bits, since routing reads every
    block of a matched prompt and must not loop over holders per block.
    """

    def __init__(self, index: PrefixIndex, ttl_s: float = 5.0) -> None:
        self.index = index
        self.ttl_s = ttl_s
        self._expiry: dict[int, dict[str, float]] = {}
        self._masks: dict[int, int] = {}
        self._queue: deque[tuple[float, str, tuple[int, ...]]] = deque()

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, replica_id: str, hashes: Sequence[int], now: float) -> None:
        bit = self.index.bit_of(replica_id)
        if bit is None:
            return
        expiry, flag = now + self.ttl_s, 1 << bit
        masks = self._masks
        for h in hashes:
            self._expiry.setdefault(h, {})[replica_id] = expiry
            masks[h] = masks.get(h, 0) | flag
        self._queue.append((expiry, replica_id, tuple(hashes)))

    def expire(self, now: float) -> None:
        while self._queue and self._queue[0][0] <= now:
            _, replica_id, hashes = self._queue.popleft()
            bit = self.index.bit_of(replica_id)
            keep = ~(1 << bit) if bit is not None else -1
            for h in hashes:
                holders = self._expiry.get(h)
                # A later guess for the same block and replica pushed its expiry out: keep it.
                if holders and holders.get(replica_id, now + 1) <= now:
                    del holders[replica_id]
                    if holders:
                        self._masks[h] &= keep
                    else:
                        del self._expiry[h]
                        del self._masks[h]

    def drop_replica(self, replica_id: str) -> None:
        """Forget a replica's guesses; call before its index bit is released."""
        bit = self.index.bit_of(replica_id)
        keep = ~(1 << bit) if bit is not None else -1
        for h in [h for h, holders in self._expiry.items() if holders.pop(replica_id, None)]:
            if self._expiry[h]:
                self._masks[h] &= keep
            else:
                del self._expiry[h]
                del self._masks[h]

    def rows(self, hashes: Sequence[int]) -> np.ndarray | None:
        """Replica bit rows (the index's layout) of the speculated holders of each block; None if none."""
        if not self._masks:
            return None
        masks: list[int] = []
        get = self._masks.get
        for h in hashes:
            mask = get(h)
            if not mask:
                break  # a prefix cannot continue past a block nobody is guessed to hold
            masks.append(mask)
        if not masks:
            return None
        words = self.index.words
        rows = np.zeros((len(hashes), words), dtype=np.uint64)
        for w in range(words):
            rows[: len(masks), w] = [(m >> (64 * w)) & 0xFFFFFFFFFFFFFFFF for m in masks]
        return rows
