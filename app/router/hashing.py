"""Chained prefix-cache block hashes over token ids.

A block's key depends on its own tokens and on every block before it, so equal keys mean equal
prefixes. The ingress and the simulated engine both call these functions; nothing here does I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable, Sequence
from typing import NewType

import xxhash

BlockHash = NewType("BlockHash", int)
"""The low 64 bits of a block's hash, as vLLM publishes them in KV events."""

_PARENT = struct.Struct("<Q")


def none_hash(seed: int = 0) -> BlockHash:
    """The parent hash of a prompt's first block (vLLM's NONE_HASH), fixed by a seed."""
    return BlockHash(xxhash.xxh3_64_intdigest(f"none-hash:{seed}".encode()))


def hash_block(
    parent: BlockHash, token_ids: Sequence[int], extra_keys: tuple[Hashable, ...] | None = None
) -> BlockHash:
    """Hash one full block: (parent hash, token ids, extra keys such as a LoRA name or cache salt)."""
    h = xxhash.xxh3_64(_PARENT.pack(parent))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return BlockHash(h.intdigest())


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    seed: int = 0,
    extra_keys: tuple[Hashable, ...] | None = None,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Chained hashes of every full block of `token_ids`; a trailing partial block is not hashed.

    `parent` continues a chain (for blocks filled by generated tokens); otherwise the chain starts
    at `none_hash(seed)`. Extra keys are folded into every block so that, for example, the same
    prompt under two LoRA adapters never shares cache entries.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    previous = none_hash(seed) if parent is None else parent
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash_block(previous, token_ids[start : start + block_size], extra_keys)
        hashes.append(previous)
    return hashes
