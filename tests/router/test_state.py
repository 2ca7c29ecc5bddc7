from app.kv.events import AllBlocksCleared, BlockRemoved, BlockStored
from app.router.state import ClusterState, ReplicaInfo


def stored(*hashes: int) -> BlockStored:
    return BlockStored(block_hashes=list(hashes), parent_block_hash=None, token_ids=[], block_size=16)


def test_kv_events_apply_in_order_even_when_batched():
    state = ClusterState()
    state.register(ReplicaInfo(replica_id="a", model="m", block_size=16, num_gpu_blocks=100))
    state.apply_kv_events("a", [stored(11, 12), stored(13), BlockRemoved(block_hashes=[13]), stored(14)])
    assert state.index.match([11, 12, 13]) == {"a": 2}
    assert state.index.match([14]) == {"a": 1}
    state.apply_kv_events("a", [stored(15), BlockRemoved(block_hashes=[15]), stored(15)])
    assert state.index.match([15]) == {"a": 1}
    state.apply_kv_events("a", [stored(16), AllBlocksCleared(), stored(17)])
    assert state.index.match([11]) == {} and state.index.match([16]) == {} and state.index.match([17]) == {"a": 1}
