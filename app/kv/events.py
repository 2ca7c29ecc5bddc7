"""vLLM's KV-cache events: what an engine stored or evicted, in the format it publishes them.

vLLM sends each batch over ZMQ as three frames: topic, an 8-byte big-endian sequence number, and a
msgpack payload `[timestamp, [event, ...], data_parallel_rank]`. vLLM 0.32 writes each event as a
map with a `type` key; older builds (msgspec `array_like` tagged structs) write
`["BlockStored", field, ...]`. Both decode here. The simulated engine encodes with `encode_batch` so
it travels the same path as a real engine's events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from app.kv.hashing import BlockHash


class KVEventDecodeError(ValueError):
    """A payload that is not a vLLM KV-event batch."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    lora_name: str | None = None
    medium: str | None = "GPU"


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[BlockHash]
    medium: str | None = "GPU"


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    timestamp: float
    events: list[KVEvent] = field(default_factory=list)
    data_parallel_rank: int | None = None


# Positional field order of the tagged-array encoding (msgspec array_like structs).
_ARRAY_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


def _as_hash(value: Any) -> BlockHash:
    # Engines that publish raw digests (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0) send bytes.
    if isinstance(value, bytes | bytearray):
        return BlockHash(int.from_bytes(value, "big") & ((1 << 64) - 1))
    if isinstance(value, int) and not isinstance(value, bool):
        return BlockHash(value & ((1 << 64) - 1))
    raise KVEventDecodeError(f"block hash must be an int or bytes, got {type(value).__name__}")


def _event_from_fields(kind: str, fields: dict[str, Any]) -> KVEvent:
    try:
        if kind == "BlockStored":
            parent = fields.get("parent_block_hash")
            return BlockStored(
                block_hashes=[_as_hash(h) for h in fields["block_hashes"]],
                parent_block_hash=None if parent is None else _as_hash(parent),
                token_ids=list(fields.get("token_ids") or []),
                block_size=int(fields["block_size"]),
                lora_id=fields.get("lora_id"),
                lora_name=fields.get("lora_name"),
                medium=fields.get("medium"),
            )
        if kind == "BlockRemoved":
            return BlockRemoved(block_hashes=[_as_hash(h) for h in fields["block_hashes"]], medium=fields.get("medium"))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
    except (KeyError, TypeError, ValueError) as exc:
        raise KVEventDecodeError(f"malformed {kind} event: {exc}") from exc
    raise KVEventDecodeError(f"unknown KV event type {kind!r}")


def _decode_event(raw: Any) -> KVEvent:
    if isinstance(raw, dict):
        kind = raw.get("type")
        if not isinstance(kind, str):
            raise KVEventDecodeError("KV event map has no 'type'")
        return _event_from_fields(kind, raw)
    if isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = _ARRAY_FIELDS.get(kind)
        if names is None:
            raise KVEventDecodeError(f"unknown KV event type {kind!r}")
        return _event_from_fields(kind, dict(zip(names, raw[1:], strict=False)))
    raise KVEventDecodeError(f"cannot decode KV event of type {type(raw).__name__}")


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode the msgpack payload frame of one published batch."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise KVEventDecodeError(f"not msgpack: {exc}") from exc
    if not isinstance(raw, list | tuple) or len(raw) < 2 or not isinstance(raw[1], list | tuple):
        raise KVEventDecodeError("a KV event batch is [timestamp, [events...], data_parallel_rank]")
    rank = raw[2] if len(raw) > 2 else None
    return KVEventBatch(timestamp=float(raw[0]), events=[_decode_event(e) for e in raw[1]], data_parallel_rank=rank)


def _event_to_map(event: KVEvent) -> dict[str, Any]:
    if isinstance(event, BlockStored):
        return {
            "type": "BlockStored",
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "lora_name": event.lora_name,
            "medium": event.medium,
        }
    if isinstance(event, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": list(event.block_hashes), "medium": event.medium}
    return {"type": "AllBlocksCleared"}


def encode_batch(timestamp: float, events: Sequence[KVEvent], data_parallel_rank: int | None = None) -> bytes:
    """The payload frame vLLM 0.32 publishes for these events."""
    return msgpack.packb([timestamp, [_event_to_map(e) for e in events], data_parallel_rank], use_bin_type=True)
