import msgpack
import pytest

from app.kv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventDecodeError,
    decode_batch,
    encode_batch,
)


def test_round_trip_in_vllm_map_format() -> None:
    events = [
        BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=list(range(32)), block_size=16),
        BlockRemoved(block_hashes=[1]),
        AllBlocksCleared(),
    ]
    payload = encode_batch(12.5, events, 0)
    raw = msgpack.unpackb(payload)
    assert raw[1][0]["type"] == "BlockStored" and raw[1][0]["block_hashes"] == [1, 2]
    batch = decode_batch(payload)
    assert batch.timestamp == 12.5 and batch.data_parallel_rank == 0
    assert batch.events[0].block_hashes == [1, 2] and batch.events[0].block_size == 16
    assert isinstance(batch.events[1], BlockRemoved) and isinstance(batch.events[2], AllBlocksCleared)


def test_tagged_array_format_and_byte_hashes() -> None:
    digest = bytes(range(32))
    payload = msgpack.packb(
        [1.0, [["BlockStored", [digest], None, [1, 2], 2, None, "GPU"], ["BlockRemoved", [7], "GPU"]], None]
    )
    batch = decode_batch(payload)
    assert batch.events[0].block_hashes == [int.from_bytes(digest, "big") & ((1 << 64) - 1)]
    assert batch.events[1].block_hashes == [7]


@pytest.mark.parametrize(
    "payload", [b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([1.0, [{"type": "Nope"}]]),
                msgpack.packb([1.0, [{"type": "BlockStored"}]])]
)
def test_garbage_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(payload)
