"""The simulated engine models LoRA adapters as vLLM does: slots, loads that cost time, least recently used
eviction of idle adapters, requests waiting for a slot, and vLLM's `vllm:lora_requests_info` metric."""

from app.engines.simulated.metrics import EngineMetrics
from app.engines.vllm.metrics import adapter_load
from app.protocol.engine import EngineStats
from tests.engines.sim_helpers import make_core, request


def adapter_request(request_id: str, adapter: str | None, tokens: int = 8):
    return request(request_id, list(range(1, tokens + 1)), max_tokens=4).model_copy(
        update={"lora_name": adapter, "lora_path": f"/adapters/{adapter}" if adapter else None})


def run(core, now: float = 0.0, steps: int = 50) -> float:
    for _ in range(steps):
        if not core.has_work:
            break
        now += core.step(now).duration
    return now


def test_a_load_costs_time_once_and_then_the_adapter_stays():
    core = make_core(max_loras=2, lora_load_s=0.5)
    core.add_request(adapter_request("a", "sql"), 0.0)
    first = core.step(0.0).duration
    assert first >= 0.5 and core.adapters.loaded == ["sql"] and core.adapters.loads == 1
    run(core, first)
    core.add_request(adapter_request("b", "sql"), 10.0)
    assert core.step(10.0).duration < 0.5, "already in its slot: no second load"
    assert core.adapters.loads == 1


def test_full_slots_evict_the_least_recently_used_idle_adapter():
    core = make_core(max_loras=2, lora_load_s=0.01)
    for i, adapter in enumerate(["a", "b", "a", "c"]):
        core.add_request(adapter_request(f"r{i}", adapter), float(i))
        run(core, float(i))
    # a was used after b, so b (least recently used) made room for c.
    assert core.adapters.loaded == ["a", "c"]
    assert (core.adapters.loads, core.adapters.evictions) == (3, 1)


def test_a_request_whose_adapter_has_no_free_slot_waits_while_others_go_on():
    core = make_core(max_loras=1, lora_load_s=0.0)
    core.add_request(adapter_request("x1", "x", tokens=4), 0.0)
    core.add_request(adapter_request("y1", "y", tokens=4), 0.0)   # needs the only slot, held by x
    core.add_request(adapter_request("base", None, tokens=4), 0.0)  # no adapter: never waits for a slot
    core.step(0.0)
    state = core.adapters
    assert state.running == ["x"] and state.waiting == ["y"]
    assert {seq.request.request_id for seq in core._running} == {"x1", "base"}
    run(core)
    assert core.adapters.loaded == ["y"], "y ran once x finished"


def test_the_engines_metric_reads_back_as_vllms():
    core = make_core(max_loras=3)
    core.add_request(adapter_request("r", "sql"), 0.0)
    core.add_request(adapter_request("s", "chat"), 0.0)
    core.step(0.0)
    stats = EngineStats(engine_id="e", model="m", cache_config=core.cache_config, adapters=core.adapters,
                        timestamp=1.0, num_requests_running=core.num_running)
    page = EngineMetrics(model="m", engine="e", stats=lambda: stats).render().decode()
    assert 'vllm:lora_requests_info{max_lora="3"' in page
    read = adapter_load(page)
    assert (read.max_loras, read.running, read.waiting) == (3, ["chat", "sql"], [])


def test_the_latest_lora_series_wins():
    page = ('vllm:lora_requests_info{max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""} 100.0\n'
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="b,c",waiting_lora_adapters="d"} 200.0\n')
    read = adapter_load(page)
    assert (read.running, read.waiting) == (["b", "c"], ["d"])
    assert adapter_load("vllm:num_requests_running 1\n") is None
