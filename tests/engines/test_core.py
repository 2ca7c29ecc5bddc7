import pytest

from app.engines.simulated.config import StepTimeConfig
from app.engines.simulated.timing import StepWork, step_duration
from app.protocol.engine import EngineRequestRejected
from tests.engines.sim_helpers import EOS, make_core, request, run_until_idle


def test_a_request_produces_max_tokens_then_finishes_with_length():
    core = make_core()
    core.add_request(request("a", list(range(10, 20)), max_tokens=5), 0.0)
    outputs, _, _ = run_until_idle(core)
    tokens = [t for out in outputs["a"] for t in out.new_token_ids]
    assert len(tokens) == 5
    assert outputs["a"][-1].finish_reason == "length"
    assert core.num_running == core.num_waiting == 0
    assert core.cache.usage == 0.0


def test_continuous_batching_bounds_the_batch_and_queues_the_rest():
    core = make_core(max_num_seqs=2)
    for i in range(5):
        core.add_request(request(f"r{i}", [10 + i] * 8, max_tokens=3), 0.0)
    core.step(0.0)
    assert core.num_running == 2
    assert core.num_waiting == 3
    outputs, _, _ = run_until_idle(core)
    assert all(outputs[f"r{i}"][-1].finish_reason == "length" for i in range(5))


def test_a_repeated_prompt_hits_the_prefix_cache_except_its_last_token():
    core = make_core()
    prompt = list(range(10, 30))  # 20 tokens = 5 blocks of 4
    core.add_request(request("first", prompt), 0.0)
    run_until_idle(core)
    core.add_request(request("second", prompt), 1.0)
    outputs, _, _ = run_until_idle(core, 1.0)
    # The last prompt token is always recomputed, so at most (20 - 1) // 4 = 4 blocks hit.
    assert outputs["second"][0].num_cached_tokens == 16
    assert core.counters.prefix_cache_queries == 40
    assert core.counters.prefix_cache_hits == 16


def test_cached_prefill_is_faster_than_cold_prefill():
    no_overhead = StepTimeConfig(step_overhead_s=0.0)
    core = make_core(max_num_batched_tokens=512, num_blocks=256, step_time=no_overhead)
    prompt = list(range(10, 210))
    core.add_request(request("cold", prompt, max_tokens=1), 0.0)
    cold = core.step(0.0).duration
    run_until_idle(core)
    core.add_request(request("warm", prompt, max_tokens=1), 1.0)
    warm = core.step(1.0).duration
    assert warm < cold / 5


def test_a_request_that_does_not_fit_waits_until_blocks_free_up():
    core = make_core(num_blocks=8, max_num_seqs=4)  # 32 tokens of KV
    core.add_request(request("big", list(range(10, 38)), max_tokens=4), 0.0)  # 7 blocks of prompt
    core.add_request(request("next", list(range(40, 48)), max_tokens=4), 0.0)  # 2 more do not fit
    core.step(0.0)
    assert core.num_running == 1 and core.num_waiting == 1
    outputs, _, _ = run_until_idle(core)
    assert outputs["next"][-1].finish_reason == "length"


def test_a_request_larger_than_the_whole_cache_or_context_is_rejected():
    core = make_core(num_blocks=4)
    with pytest.raises(EngineRequestRejected, match="KV blocks"):
        core.add_request(request("huge", list(range(10, 40)), max_tokens=4), 0.0)
    with pytest.raises(EngineRequestRejected, match="context"):
        make_core().add_request(request("long", [10] * 250, max_tokens=10), 0.0)


def test_growing_sequences_preempt_the_newest_and_still_all_finish():
    core = make_core(num_blocks=10, max_num_seqs=4)
    for i in range(3):
        core.add_request(request(f"r{i}", [10 + i] * 8, max_tokens=12), 0.0)
    outputs, _, _ = run_until_idle(core)
    assert core.counters.num_preemptions > 0
    assert all(sum(len(o.new_token_ids) for o in outputs[f"r{i}"]) == 12 for i in range(3))


def test_long_prompts_are_prefilled_in_chunks_of_the_token_budget():
    core = make_core(max_num_batched_tokens=16, num_blocks=64)
    core.add_request(request("long", list(range(10, 58)), max_tokens=1), 0.0)  # 48 tokens
    _, _, steps = run_until_idle(core)
    assert [s.work.prefill_tokens for s in steps] == [16, 16, 16]


def test_greedy_output_depends_only_on_the_prompt():
    outputs = []
    for seed in (1, 2):
        core = make_core(seed=seed)
        core.add_request(request("a", list(range(10, 30)), max_tokens=8, temperature=0.0), 0.0)
        result, _, _ = run_until_idle(core)
        outputs.append([t for o in result["a"] for t in o.new_token_ids])
    assert outputs[0] == outputs[1]


def test_same_seed_same_run():
    def run() -> list[int]:
        core = make_core(seed=7)
        core.add_request(request("a", list(range(10, 30)), max_tokens=8), 0.0)
        result, _, _ = run_until_idle(core)
        return [t for o in result["a"] for t in o.new_token_ids]

    assert run() == run()


def test_eos_ends_a_request_unless_ignore_eos():
    core = make_core(mean_output_tokens=1.0)  # EOS on the first token
    core.add_request(request("a", [10] * 8, max_tokens=8, ignore_eos=False), 0.0)
    outputs, _, _ = run_until_idle(core)
    assert outputs["a"][-1].finish_reason == "stop"
    assert outputs["a"][-1].new_token_ids == [EOS]


def test_stop_token_ids_end_a_request():
    core = make_core()
    core.add_request(request("a", [10] * 8, max_tokens=50, stop_token_ids=list(range(10, 500))), 0.0)
    outputs, _, _ = run_until_idle(core)
    assert outputs["a"][-1].finish_reason == "stop"
    assert outputs["a"][-1].stop_reason in range(10, 500)


def test_prefill_decode_handoff_returns_params_and_decode_skips_prefill():
    prompt = list(range(10, 74))  # 64 tokens = 16 blocks
    prefill = make_core(max_num_batched_tokens=512)
    prefill.add_request(request("p", prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True}), 0.0)
    outputs, _, _ = run_until_idle(prefill)
    params = outputs["p"][-1].kv_transfer_params
    assert params["do_remote_prefill"] is True
    assert params["remote_engine_id"] == prefill.engine_id
    assert len(params["remote_block_ids"][0]) == 16

    decode = make_core(max_num_batched_tokens=512)
    decode.add_request(request("d", prompt, max_tokens=4, kv_transfer_params=params), 0.0)
    first_step = decode.step(0.0)
    assert first_step.work.prefill_tokens == 4  # the last partial block (the last token's block) is recomputed
    assert first_step.work.transferred_blocks == 15
    assert decode.counters.external_prefix_cache_hits == 60


def test_step_time_formula():
    cost = StepTimeConfig(step_overhead_s=0.01, prefill_s_per_token=0.001, decode_s_per_seq=0.002,
                          kv_transfer_s_per_block=0.003)
    assert step_duration(StepWork(100, 4, 2), cost) == pytest.approx(0.01 + 0.1 + 0.008 + 0.006)
    assert step_duration(StepWork(), cost) == 0.0


def test_priority_policy_runs_lower_values_first():
    core = make_core(max_num_seqs=1, scheduling_policy="priority")
    core.add_request(request("low", [10] * 4, max_tokens=1).model_copy(update={"priority": 5}), 0.0)
    core.add_request(request("high", [11] * 4, max_tokens=1).model_copy(update={"priority": -1}), 0.0)
    first = core.step(0.0)
    assert [o.request_id for o in first.outputs] == ["high"]


def test_abort_frees_blocks():
    core = make_core()
    core.add_request(request("a", list(range(10, 30)), max_tokens=50), 0.0)
    core.step(0.0)
    assert core.cache.usage > 0
    assert core.abort("a")
    assert core.cache.usage == 0.0 and not core.has_work
    assert not core.abort("a")
