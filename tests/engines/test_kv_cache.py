from app.engines.simulated.kv_cache import KVCache
from app.kv.hashing import BlockHash


def test_committed_blocks_are_found_again_after_release():
    cache = KVCache(num_blocks=8, block_size=4)
    blocks = cache.allocate(2)
    cache.commit(blocks[0], BlockHash(1))
    cache.commit(blocks[1], BlockHash(2))
    cache.release(blocks)
    assert cache.num_free_blocks == 8
    assert cache.cached_prefix([BlockHash(1), BlockHash(2), BlockHash(3)]) == blocks
    assert cache.cached_prefix([BlockHash(2)]) == blocks[1:]  # a lookup is by key, chain order is the caller's


def test_lookup_stops_at_the_first_miss():
    cache = KVCache(num_blocks=8, block_size=4)
    blocks = cache.allocate(2)
    cache.commit(blocks[0], BlockHash(1))
    cache.commit(blocks[1], BlockHash(2))
    assert cache.cached_prefix([BlockHash(9), BlockHash(2)]) == []


def test_least_recently_freed_prefix_is_evicted_first_and_empty_blocks_before_cached_ones():
    cache = KVCache(num_blocks=3, block_size=4)
    old, new, empty = cache.allocate(1), cache.allocate(1), cache.allocate(1)
    cache.commit(old[0], BlockHash(1))
    cache.commit(new[0], BlockHash(2))
    cache.release(old)
    cache.release(new)
    cache.release(empty)  # holds nothing: reused first
    cache.allocate(1)
    assert cache.cached_prefix([BlockHash(1)]) and cache.cached_prefix([BlockHash(2)])
    cache.allocate(1)  # now the oldest cached block goes
    assert cache.cached_prefix([BlockHash(1)]) == []
    assert cache.cached_prefix([BlockHash(2)])


def test_shared_blocks_are_not_evicted_while_referenced():
    cache = KVCache(num_blocks=2, block_size=4)
    (block,) = cache.allocate(1)
    cache.commit(block, BlockHash(7))
    cache.acquire([block])  # a second request shares it
    cache.release([block])
    assert not cache.can_allocate(2)
    assert cache.usage == 0.5


def test_can_allocate_counts_idle_reused_blocks():
    cache = KVCache(num_blocks=2, block_size=4)
    (block,) = cache.allocate(1)
    cache.commit(block, BlockHash(7))
    cache.release([block])
    assert cache.can_allocate(2)
    assert not cache.can_allocate(2, reused=[block])
    assert cache.can_allocate(1, reused=[block])
