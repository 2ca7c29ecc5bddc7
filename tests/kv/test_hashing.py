"""The router's block keys must be the very keys vLLM computes and publishes."""

import hashlib
import pickle

import cbor2
import pytest
import xxhash

from app.kv.hashing import BlockHasher, external_hash


def vllm_reference(tokens: list[int], block_size: int, *, seed: str = "0", extra_first=None, extra_rest=None):
    """vLLM's scheme written out longhand: sha256(pickle((parent, tuple(block), extra_keys)))."""

    def h(obj: object) -> bytes:
        return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()

    parent = h(seed)
    out = []
    for i in range(len(tokens) // block_size):
        extra = extra_first if i == 0 else extra_rest
        parent = h((parent, tuple(tokens[i * block_size : (i + 1) * block_size]), extra))
        out.append(int.from_bytes(parent, "big") & ((1 << 64) - 1))
    return out


@pytest.mark.parametrize("block_size", [16, 32])
def test_keys_equal_vllm_sha256_for_any_block_size(block_size: int) -> None:
    tokens = list(range(1, 200))
    assert BlockHasher().block_hashes(tokens, block_size) == vllm_reference(tokens, block_size)


def test_lora_on_every_block_and_cache_salt_on_the_first_only() -> None:
    """vLLM 0.32's extra keys (v1/core/kv_cache_utils.py): ("lora", name, path) on every block, then
    ("cache_salt", salt) on the first."""
    tokens = list(range(100))
    hasher = BlockHasher()
    lora = ("lora", "sql", "/adapters/sql")
    assert hasher.block_hashes(tokens, 16, lora_name="sql", lora_path="/adapters/sql") == vllm_reference(
        tokens, 16, extra_first=(lora,), extra_rest=(lora,)
    )
    assert hasher.block_hashes(tokens, 16, cache_salt="tenant-a") == vllm_reference(
        tokens, 16, extra_first=(("cache_salt", "tenant-a"),), extra_rest=None
    )
    assert hasher.block_hashes(tokens, 16, lora_name="sql", lora_path="/adapters/sql", cache_salt="s") == (
        vllm_reference(tokens, 16, extra_first=(lora, ("cache_salt", "s")), extra_rest=(lora,))
    )
    # Another adapter under the same name misses, as in vLLM.
    assert hasher.block_hashes(tokens, 16, lora_name="sql", lora_path="/adapters/sql-v2") != hasher.block_hashes(
        tokens, 16, lora_name="sql", lora_path="/adapters/sql")


def test_seed_and_algorithms() -> None:
    tokens = list(range(64))
    assert BlockHasher(seed="1").block_hashes(tokens, 16) == vllm_reference(tokens, 16, seed="1")
    cbor = BlockHasher("sha256_cbor")
    none = hashlib.sha256(cbor2.dumps("0", canonical=True)).digest()
    first = hashlib.sha256(cbor2.dumps((none, tuple(tokens[:16]), None), canonical=True)).digest()
    assert cbor.block_hashes(tokens, 16)[0] == external_hash(first)
    xx = BlockHasher("xxhash")
    none = xxhash.xxh3_128_digest(pickle.dumps("0", protocol=pickle.HIGHEST_PROTOCOL))
    first = xxhash.xxh3_128_digest(pickle.dumps((none, tuple(tokens[:16]), None), protocol=pickle.HIGHEST_PROTOCOL))
    assert xx.block_hashes(tokens, 16)[0] == external_hash(first)
    with pytest.raises(ValueError, match="unknown prefix-caching hash algorithm"):
        BlockHasher("md5")


def test_only_full_blocks_and_chains_continue() -> None:
    hasher = BlockHasher()
    assert hasher.block_hashes(list(range(31)), 16) == hasher.block_hashes(list(range(16)), 16)
    assert hasher.block_hashes(list(range(15)), 16) == []
    tokens = list(range(64))
    full = hasher.digests(tokens, 16)
    assert hasher.digests(tokens[32:], 16, parent=full[1], first_block_index=2) == full[2:]


def test_shared_prefix_shares_keys_and_divergence_changes_all_later_keys() -> None:
    hasher = BlockHasher()
    a = hasher.block_hashes(list(range(64)), 16)
    b = hasher.block_hashes([*range(48), *range(100, 116)], 16)
    assert a[:3] == b[:3] and a[3] != b[3]
    c = hasher.block_hashes([999, *range(1, 64)], 16)
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_lora_and_salt_keys_equal_vllms_own_function() -> None:
    """Against the installed vLLM's own extra-key function, where vLLM is installed."""
    kv_cache_utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    lora = type("Lora", (), {"lora_name": "sql", "lora_path": "/adapters/sql"})()
    request = type("Request", (), {"lora_request": lora, "cache_salt": "s", "mm_features": [],
                                   "prompt_embeds": None})()
    first, _ = kv_cache_utils.generate_block_hash_extra_keys(request, 0, 16, 0)
    rest, _ = kv_cache_utils.generate_block_hash_extra_keys(request, 16, 32, 0)
    tokens = list(range(32))
    assert BlockHasher().block_hashes(tokens, 16, lora_name="sql", lora_path="/adapters/sql", cache_salt="s") == (
        vllm_reference(tokens, 16, extra_first=first, extra_rest=rest))
