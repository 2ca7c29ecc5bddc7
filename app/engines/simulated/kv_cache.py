"""A paged KV cache with prefix caching, as vLLM keeps it.

Fixed blocks; a block that is full carries the chained hash of its tokens and can be shared by any
later request with the same prefix. Unreferenced blocks stay cached in an LRU queue until the
space is needed. No timing and no I/O here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from app.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from app.kv.hashing import BlockHash


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class KVCache:
    """Block allocator with a prefix cache keyed by chained block hashes.

    Like vLLM with KV events enabled, it records a BlockStored event when a block enters the prefix
    cache and a BlockRemoved event when a cached block is evicted; `take_events` drains them.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [KVBlock(i) for i in range(num_blocks)]
        # Eviction order: the first entry is reused first. Empty blocks go to the front, cached
        # blocks to the back, so the cache keeps the most recently freed prefixes longest.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self._blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self.events: list[KVEvent] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running requests (vLLM's kv_cache_usage_perc)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, block_hashes: Sequence[BlockHash]) -> list[KVBlock]:
        """The longest run of leading blocks already in the cache."""
        if not self.enable_prefix_caching:
            return []
        hits: list[KVBlock] = []
        for block_hash in block_hashes:
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, num_new_blocks: int, reused: Sequence[KVBlock] = ()) -> bool:
        # Reusing a cached block that nobody holds takes it off the free queue too.
        idle_reused = sum(1 for block in reused if block.ref_count == 0)
        return num_new_blocks <= len(self._free) - idle_reused

    def acquire(self, blocks: Sequence[KVBlock]) -> None:
        """Take a reference on cached blocks a new request reuses."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        if num_blocks > len(self._free):
            raise MemoryError(f"need {num_blocks} KV blocks, {len(self._free)} free")
        allocated = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                # Evicting: the cached prefix is lost.
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                    self.events.append(BlockRemoved(block_hashes=[block.block_hash]))
                block.block_hash = None
            block.ref_count = 1
            allocated.append(block)
        return allocated

    def commit(
        self,
        block: KVBlock,
        block_hash: BlockHash,
        *,
        parent_hash: BlockHash | None = None,
        token_ids: Sequence[int] = (),
        lora_name: str | None = None,
    ) -> None:
        """Mark a block full: later requests with the same prefix can reuse it."""
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        # A duplicate of an already cached block stays private; the first copy serves lookups.
        if block_hash not in self._cached:
            self._cached[block_hash] = block
            self.events.append(
                BlockStored(
                    block_hashes=[block_hash],
                    parent_block_hash=parent_hash,
                    token_ids=list(token_ids),
                    block_size=self.block_size,
                    lora_name=lora_name,
                )
            )

    def cached_hashes(self) -> list[BlockHash]:
        return list(self._cached)

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's reset_prefix_cache); blocks in use stay allocated."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        self.events.append(AllBlocksCleared())

    def release(self, blocks: Sequence[KVBlock]) -> None:
        """Drop a request's references; later blocks of a request are evicted before earlier ones."""
        for block in reversed(blocks):
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            self._free[block.block_id] = block
            if block.block_hash is None:
                self._free.move_to_end(block.block_id, last=False)
