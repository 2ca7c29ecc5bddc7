from app.router.hashing import block_hashes, hash_block, none_hash


def test_only_full_blocks_are_hashed():
    assert len(block_hashes(list(range(31)), 16)) == 1
    assert len(block_hashes(list(range(32)), 16)) == 2
    assert block_hashes(list(range(15)), 16) == []


def test_equal_prefixes_give_equal_keys_and_divergence_changes_all_later_keys():
    a = block_hashes(list(range(64)), 16)
    b = block_hashes([*range(48), *range(100, 116)], 16)
    assert a[:3] == b[:3]
    assert a[3] != b[3]
    # Chaining: the same block content after a different prefix has a different key.
    c = block_hashes([999, *range(1, 64)], 16)
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_chain_is_parent_linked_and_can_be_continued():
    tokens = list(range(64))
    full = block_hashes(tokens, 16)
    assert full[0] == hash_block(none_hash(0), tokens[:16])
    assert full[1] == hash_block(full[0], tokens[16:32])
    assert block_hashes(tokens[32:], 16, parent=full[1]) == full[2:]


def test_block_size_seed_and_extra_keys_change_keys():
    tokens = list(range(64))
    assert block_hashes(tokens, 16) != block_hashes(tokens, 32)[:1]
    assert block_hashes(tokens, 16, seed=1) != block_hashes(tokens, 16, seed=0)
    assert block_hashes(tokens, 16, extra_keys=("lora", "a")) != block_hashes(tokens, 16)


def test_keys_are_64_bit_ints():
    assert all(0 <= h < 2**64 for h in block_hashes(list(range(160)), 16))
