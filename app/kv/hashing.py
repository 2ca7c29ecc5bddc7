"""Prefix-cache block hashes computed exactly as vLLM computes them.

vLLM keys each full block of a prompt by H((parent digest, tuple(block token ids), extra keys)),
where the first block's parent is NONE_HASH = H(seed) and H is the engine's
`--prefix-caching-hash-algo`. Its KV events publish the low 64 bits of each digest as an int.
Computing the same keys here lets the router match a prompt against the blocks an engine reports,
block for block, without asking the engine. Nothing here does I/O.

Extra keys follow vLLM: the LoRA adapter name on every block, the cache salt on the first block
only. `None` when neither applies (the common case), which changes the serialized bytes: a salted or
LoRA prompt never shares keys with a plain one.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Literal, NewType

import xxhash

BlockHash = NewType("BlockHash", int)
"""A block's key as the router and KV events use it: the low 64 bits of its digest."""

HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
HASH_ALGOS: tuple[str, ...] = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_HASH_ALGO: HashAlgo = "sha256"
DEFAULT_HASH_SEED = "0"
"""vLLM seeds NONE_HASH from PYTHONHASHSEED; engines we start set PYTHONHASHSEED=0 to match."""

_LOW_64 = (1 << 64) - 1


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _cbor(obj: Any) -> bytes:
    import cbor2  # only for the *_cbor algorithms

    return cbor2.dumps(obj, canonical=True)


_SERIALIZE: dict[str, Callable[[Any], bytes]] = {
    "sha256": _pickle,
    "sha256_cbor": _cbor,
    "xxhash": _pickle,
    "xxhash_cbor": _cbor,
}
_DIGEST: dict[str, Callable[[bytes], bytes]] = {
    "sha256": lambda data: hashlib.sha256(data).digest(),
    "sha256_cbor": lambda data: hashlib.sha256(data).digest(),
    "xxhash": xxhash.xxh3_128_digest,
    "xxhash_cbor": xxhash.xxh3_128_digest,
}


def external_hash(digest: bytes) -> BlockHash:
    """The int vLLM publishes for a digest: its low 64 bits, big-endian."""
    return BlockHash(int.from_bytes(digest, "big") & _LOW_64)


def block_extra_keys(
    block_index: int, lora_name: str | None, cache_salt: str | None, lora_path: str | None = None
) -> tuple[tuple[str, ...], ...] | None:
    """What vLLM (0.32) folds into a block's hash besides its tokens: the adapter on every block, as
    ("lora", name, path), so that a name pointed at another adapter misses; the cache salt on the first."""
    keys: list[tuple[str, ...]] = []
    if lora_name:
        keys.append(("lora", lora_name, lora_path or ""))
    if cache_salt and block_index == 0:
        keys.append(("cache_salt", cache_salt))
    return tuple(keys) if keys else None


class BlockHasher:
    """One engine configuration's hash function: algorithm plus NONE_HASH seed."""

    def __init__(self, algo: str = DEFAULT_HASH_ALGO, seed: str | int = DEFAULT_HASH_SEED) -> None:
        if algo not in _SERIALIZE:
            raise ValueError(f"unknown prefix-caching hash algorithm {algo!r}; use one of {', '.join(HASH_ALGOS)}")
        self.algo = algo
        self.seed = str(seed)
        self._serialize = _SERIALIZE[algo]
        self._digest = _DIGEST[algo]
        self.none_hash: bytes = self.digest(self.seed)
        # Shared system prompts make the same (parent, block) pairs recur constantly, so memoize
        # them (vLLM does too). Per instance, so two algorithms or seeds never mix.
        self._lru = lru_cache(maxsize=65536)(self.hash_block)

    def digest(self, obj: Any) -> bytes:
        return self._digest(self._serialize(obj))

    def hash_block(
        self, parent: bytes | None, token_ids: Sequence[int], extra_keys: tuple[Any, ...] | None = None
    ) -> bytes:
        """Full digest of one full block, chained on its parent's digest (None for the first block)."""
        return self.digest((parent if parent else self.none_hash, tuple(token_ids), extra_keys))

    def digests(
        self,
        token_ids: Sequence[int],
        block_size: int,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        parent: bytes | None = None,
        first_block_index: int = 0,
        lora_path: str | None = None,
    ) -> list[bytes]:
        """Chained digests of every full block of `token_ids`; a trailing partial block is skipped.

        `parent` and `first_block_index` continue a chain, for blocks later filled by generated tokens.
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        out: list[bytes] = []
        previous = parent
        for i, start in enumerate(range(0, len(token_ids) - block_size + 1, block_size)):
            extra = block_extra_keys(first_block_index + i, lora_name, cache_salt, lora_path)
            previous = self._lru(previous, tuple(token_ids[start : start + block_size]), extra)
            out.append(previous)
        return out

    def block_hashes(
        self,
        token_ids: Sequence[int],
        block_size: int,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_path: str | None = None,
    ) -> list[BlockHash]:
        """The prompt's block keys as KV events report them."""
        return [external_hash(d) for d in self.digests(token_ids, block_size, lora_name=lora_name,
                                                         cache_salt=cache_salt, lora_path=lora_path)]


@lru_cache(maxsize=16)
def get_hasher(algo: str = DEFAULT_HASH_ALGO, seed: str | int = DEFAULT_HASH_SEED) -> BlockHasher:
    """A shared hasher per (algorithm, seed), so its block cache is shared by every caller."""
    return BlockHasher(algo, str(seed))
