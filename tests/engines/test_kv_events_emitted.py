"""The simulated engine publishes vLLM-format KV events whose keys are the router's keys."""

from app.kv.events import BlockRemoved, BlockStored, decode_batch, encode_batch
from app.kv.hashing import get_hasher
from tests.engines.sim_helpers import make_core, request, run_until_idle


def test_block_stored_events_carry_the_keys_the_router_computes_for_the_prompt():
    core = make_core(block_size=16, num_blocks=64)
    prompt = list(range(10, 80))  # 70 tokens: 4 full blocks
    core.add_request(request("a", prompt, max_tokens=1), 0.0)
    run_until_idle(core)
    # Through the wire format, as the deployment forwards it.
    events = decode_batch(encode_batch(0.0, core.take_kv_events())).events
    stored = [e for e in events if isinstance(e, BlockStored)]
    router_keys = get_hasher().block_hashes(prompt, 16)
    assert [h for e in stored for h in e.block_hashes] == router_keys
    # Each event names its parent and its tokens, as vLLM's do.
    assert stored[0].parent_block_hash is None and stored[1].parent_block_hash == router_keys[0]
    assert stored[2].token_ids == prompt[32:48] and stored[2].block_size == 16


def test_lora_requests_get_lora_keys():
    core = make_core(block_size=16, num_blocks=64)
    prompt = list(range(10, 50))
    req = request("a", prompt, max_tokens=1).model_copy(update={"lora_name": "sql"})
    core.add_request(req, 0.0)
    run_until_idle(core)
    stored = [h for e in core.take_kv_events() if isinstance(e, BlockStored) for h in e.block_hashes]
    assert stored == get_hasher().block_hashes(prompt, 16, lora_name="sql")
    assert stored != get_hasher().block_hashes(prompt, 16)


def test_eviction_publishes_block_removed():
    core = make_core(block_size=4, num_blocks=8, max_num_batched_tokens=64)
    core.add_request(request("a", list(range(10, 30)), max_tokens=1), 0.0)
    run_until_idle(core)
    first = [h for e in core.take_kv_events() if isinstance(e, BlockStored) for h in e.block_hashes]
    core.add_request(request("b", list(range(100, 128)), max_tokens=1), 1.0)
    run_until_idle(core, 1.0)
    removed = [h for e in core.take_kv_events() if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed and set(removed) <= set(first)
