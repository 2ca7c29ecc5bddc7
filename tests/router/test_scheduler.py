import random

import pytest

from app.router.cost import TTFTFeatures, TTFTModel
from app.router.scheduler import RoutingConfig, RoutingRequest, Scheduler
from app.router.state import ClusterState, ReplicaInfo, ReplicaStats

BLOCK = 16


def fleet(n: int = 4, **config) -> Scheduler:
    state = ClusterState()
    for i in range(n):
        state.register(ReplicaInfo(replica_id=f"r{i}", model="m", block_size=BLOCK, num_gpu_blocks=4096))
        state.update_stats(f"r{i}", ReplicaStats(), now=0.0)
    state.synced_at = 0.0
    return Scheduler(state, RoutingConfig(**config))


def prompt(group: int, question: int, system_blocks: int = 32, question_blocks: int = 4) -> RoutingRequest:
    rng = random.Random(group)
    system = [rng.getrandbits(64) for _ in range(system_blocks)]
    rng = random.Random(group * 1000 + question + 10**6)
    hashes = system + [rng.getrandbits(64) for _ in range(question_blocks)]
    return RoutingRequest(model="m", block_hashes=hashes, num_prompt_tokens=len(hashes) * BLOCK + 5, block_size=BLOCK)


def route(s: Scheduler, req: RoutingRequest, now: float = 0.0, *, first_token: bool = False):
    decision = s.schedule(req, now)
    s.on_dispatch(decision, req, decision.replica_id, now)
    if first_token:
        s.on_first_token(decision, req, decision.replica_id, ttft_s=0.05)
    return decision


def test_requests_sharing_a_prefix_follow_it_to_one_replica():
    s = fleet()
    first = route(s, prompt(1, 0))
    assert first.reason == "no_prefix"
    s.on_first_token(first, prompt(1, 0), first.replica_id, ttft_s=0.05)
    for q in range(1, 4):
        d = route(s, prompt(1, q), first_token=True)
        assert d.replica_id == first.replica_id and d.reason == "prefix"
        assert d.matched_tokens == 32 * BLOCK


def test_a_burst_on_one_prefix_stays_together_until_the_queue_outweighs_recomputing_it():
    s = fleet()
    holder = route(s, prompt(7, 0)).replica_id
    # Each queued request adds only its question to the holder's prefill queue, so a few can wait
    # there more cheaply than another replica could recompute the shared 512-token system prompt.
    assert [route(s, prompt(7, q)).replica_id for q in range(1, 3)] == [holder, holder]


def test_distinct_prefixes_spread_over_an_idle_fleet():
    s = fleet()
    chosen = {route(s, prompt(g, 0)).replica_id for g in range(12)}
    assert len(chosen) == 4


def test_load_spreads_when_the_prefix_holder_is_saturated():
    s = fleet()
    holder = route(s, prompt(2, 0)).replica_id
    s.state.update_stats(holder, ReplicaStats(num_requests_running=64, num_requests_waiting=40), now=0.0)
    d = s.schedule(prompt(2, 1), 0.0)
    assert d.replica_id != holder
    assert d.reason in ("load", "guard")


def test_guard_stops_affinity_from_piling_onto_one_replica():
    # Make recomputing the prefix so expensive, and queueing so cheap, that the cost model alone would
    # keep choosing the holder.
    s = fleet(
        ttft_prior={"per_prefill_token_s": 1.0, "per_running_request_s": 0.0},
        miss_externality=0.0,
        guard_load_slack=4,
    )
    holder = route(s, prompt(3, 0)).replica_id
    s.state.update_stats(holder, ReplicaStats(num_requests_running=10), now=0.0)
    d = s.schedule(prompt(3, 1), 0.0)
    assert d.replica_id != holder and d.reason == "guard"


def test_two_routers_with_the_same_state_agree():
    a, b = fleet(), fleet()
    for g in range(20):
        da, db = route(a, prompt(g, 0)), route(b, prompt(g, 0))
        assert da.ranked == db.ranked


def test_stale_state_routes_on_load_alone():
    s = fleet()
    holder = route(s, prompt(4, 0)).replica_id
    d = s.schedule(prompt(4, 1), now=100.0)  # nothing heard from the cluster for 100 s
    assert d.reason == "stale_state" and d.matched_tokens == 0
    assert d.replica_id != holder  # the holder has this router's request in flight


def test_baseline_policies():
    rr = fleet(policy="round_robin")
    assert [route(rr, prompt(5, q)).replica_id for q in range(5)] == ["r0", "r1", "r2", "r3", "r0"]
    p2 = fleet(policy="power_of_two")
    p2.state.update_stats("r0", ReplicaStats(num_requests_running=50), now=0.0)
    assert all(route(p2, prompt(6, q)).ranked[0] != "r0" for q in range(10))


def test_unknown_model_has_no_candidates():
    assert fleet().schedule(RoutingRequest(model="x", block_hashes=[], num_prompt_tokens=3, block_size=16), 0) is None


def test_ttft_model_calibrates_to_observed_latency():
    model = TTFTModel()
    rng = random.Random(0)
    for _ in range(1000):
        load = rng.uniform(0, 30)
        f = TTFTFeatures(prefill_tokens=rng.uniform(0, 4000), load=load, queued=max(0.0, load - 16))
        model.observe(f, 0.02 + 2e-4 * f.prefill_tokens + 1e-3 * f.load + 0.05 * f.queued)
    c = model.coefficients
    assert c["per_prefill_token_s"] == pytest.approx(2e-4, rel=0.05)
    assert c["per_running_request_s"] == pytest.approx(1e-3, rel=0.1)
    assert c["per_queued_request_s"] == pytest.approx(0.05, rel=0.1)
    assert model.predict(TTFTFeatures(1000, 10)) == pytest.approx(0.23, rel=0.05)
    assert model.predict(TTFTFeatures(1000, 20, queued=4)) == pytest.approx(0.44, rel=0.05)


def busy_fleet(**config) -> Scheduler:
    # Coefficients as the online fit finds them in overload (benchmarks/README.md): queueing dominates
    # TTFT, so the fitted per-request cost is large and the per-token cost small.
    config.setdefault("ttft_prior", {"base_s": 0.0, "per_prefill_token_s": 2.2e-5, "per_running_request_s": 0.144})
    s = fleet(**config)
    for i in range(4):
        s.state.update_stats(f"r{i}", ReplicaStats(num_requests_running=30), now=0.0)
    return s


def test_a_busy_fleet_keeps_a_group_on_its_holder_rather_than_recomputing_its_prefix_elsewhere():
    # A few more requests queued on the holder cost less than a 2048-token miss that would stall
    # the 30 requests running on any other replica.
    s = busy_fleet()
    long_prompt = prompt(8, 0, system_blocks=128, question_blocks=16)
    holder = route(s, long_prompt, first_token=True).replica_id
    s.state.update_stats(holder, ReplicaStats(num_requests_running=34), now=0.0)
    d = s.schedule(prompt(8, 1, system_blocks=128, question_blocks=16), 0.0)
    assert d.replica_id == holder and d.reason == "prefix"
    # Judged by its own TTFT alone, the request would leave the holder.
    myopic = busy_fleet(miss_externality=0.0)
    holder = route(myopic, long_prompt, first_token=True).replica_id
    myopic.state.update_stats(holder, ReplicaStats(num_requests_running=34), now=0.0)
    assert myopic.schedule(prompt(8, 1, system_blocks=128, question_blocks=16), 0.0).replica_id != holder


def test_a_busy_holder_still_sheds_load_once_its_queue_outweighs_the_miss():
    s = busy_fleet()
    long_prompt = prompt(9, 0, system_blocks=128, question_blocks=16)
    holder = route(s, long_prompt, first_token=True).replica_id
    s.state.update_stats(holder, ReplicaStats(num_requests_running=40, num_requests_waiting=20), now=0.0)
    d = s.schedule(prompt(9, 1, system_blocks=128, question_blocks=16), 0.0)
    assert d.replica_id != holder and d.reason == "load"


def test_a_full_cache_alone_does_not_push_a_group_off_its_holder():
    # vLLM reports KV usage near 1 whenever its batch is large; that is not a reason to recompute a
    # prefix elsewhere as long as the queue is short.
    s = fleet()
    holder = route(s, prompt(10, 0), first_token=True).replica_id
    for i in range(4):
        s.state.update_stats(f"r{i}", ReplicaStats(num_requests_running=4, kv_cache_usage_perc=0.5), now=0.0)
    s.state.update_stats(holder, ReplicaStats(num_requests_running=4, num_requests_waiting=1,
                                              kv_cache_usage_perc=0.99), now=0.0)
    assert s.schedule(prompt(10, 1), 0.0).replica_id == holder
    # Every block in use with a queue: the replica cannot admit the request at all.
    s.state.update_stats(holder, ReplicaStats(num_requests_running=4, num_requests_waiting=1,
                                              kv_cache_usage_perc=1.0), now=0.0)
    assert s.schedule(prompt(10, 1), 0.0).replica_id != holder


def test_ttft_model_stays_sane_when_traffic_never_varies():
    # A steady, cache-friendly stream: every request a hit of ~256 tokens on a replica with ~40
    # running, nothing queued. The features barely move, so the data cannot separate the terms; the
    # fit must stay near what it saw instead of drifting to huge opposite coefficients (with entry-
    # wise clipping of the covariance it reached base -111 s here).
    model = TTFTModel()
    rng = random.Random(1)

    def truth(f: TTFTFeatures) -> float:
        return 0.02 + 5e-5 * f.prefill_tokens + 1e-3 * f.load

    worst_miss_error = 0.0
    for _ in range(20000):
        f = TTFTFeatures(prefill_tokens=256 + rng.uniform(-5, 5), load=40 + rng.uniform(-2, 2))
        model.observe(f, truth(f) + rng.gauss(0, 0.01))
        miss = TTFTFeatures(prefill_tokens=2304, load=40)
        worst_miss_error = max(worst_miss_error, abs(model.predict(miss) - truth(miss)))
    assert model.predict(TTFTFeatures(256, 40)) == pytest.approx(truth(TTFTFeatures(256, 40)), abs=0.005)
    assert worst_miss_error < 0.15
    assert all(abs(v) < 1.0 for v in model.coefficients.values())


@pytest.mark.parametrize("policy", ["prefix_aware", "round_robin", "power_of_two"])
def test_an_adapters_requests_go_only_where_it_is_served_and_wait_while_nowhere(policy):
    from app.protocol.engine import AdapterLoad

    s = fleet(policy=policy)
    for i in range(4):  # only r2 has loaded the adapter added a moment ago; r3 says nothing (an external server)
        if i != 3:
            s.state.update_stats(f"r{i}", ReplicaStats(adapters=AdapterLoad(
                max_loras=2, served=["sql"] if i == 2 else [])), now=0.0)
    request = RoutingRequest(model="m", block_hashes=[1, 2], num_prompt_tokens=40, block_size=BLOCK, adapter="sql")
    for _ in range(6):
        assert set(s.schedule(request, 0.0).ranked) == {"r2", "r3"}
    s.state.update_stats("r2", ReplicaStats(adapters=AdapterLoad(max_loras=2, served=[])), now=0.0)
    s.state.update_stats("r3", ReplicaStats(adapters=AdapterLoad(max_loras=2, served=[])), now=0.0)
    loading = s.schedule(request, 0.0)
    assert loading.ranked == [] and loading.reason == "adapter_loading"


def test_a_replica_that_lists_its_adapters_serves_none_until_its_stats_say():
    from app.protocol.engine import AdapterLoad

    s = fleet(2)
    s.state.register(ReplicaInfo(replica_id="r0", model="m", block_size=BLOCK, num_gpu_blocks=4096,
                                 lists_adapters=True))
    request = RoutingRequest(model="m", block_hashes=[1], num_prompt_tokens=20, block_size=BLOCK, adapter="sql")
    assert s.schedule(request, 0.0).ranked == ["r1"]  # r1 says nothing (an external server): assumed to serve it
    s.state.update_stats("r0", ReplicaStats(adapters=AdapterLoad(max_loras=2, served=["sql"])), now=0.0)
    assert set(s.schedule(request, 0.0).ranked) == {"r0", "r1"}
