import pytest

from app.protocol.engine import AdapterLoad
from app.router.plugins.adapter_affinity_scorer import AdapterAffinityParams, AdapterAffinityScorer
from tests.router.plugins.views import context, make_view

PARAMS = AdapterAffinityParams(load_s=0.05, evict_s=0.1, busy_slots_s=0.5)


def costs(adapters, adapter="sql"):
    view = make_view(running=[1] * len(adapters), adapters=adapters, adapter=adapter)
    return list(AdapterAffinityScorer(PARAMS, context()).cost(view))


def test_active_then_resident_then_a_free_slot_then_busy_slots():
    fleet = [
        AdapterLoad(max_loras=2, running=["sql"]),                       # in use
        AdapterLoad(max_loras=2, running=["chat"], loaded=["chat", "sql"]),  # idle in a slot
        AdapterLoad(max_loras=2, running=["chat"]),                      # a slot to load into
        AdapterLoad(max_loras=2, running=["chat", "code"]),              # every slot busy
        AdapterLoad(max_loras=2, running=["chat", "code"], waiting=["sql"]),  # queued for a slot already
        None,                                                            # says nothing: a load, presumably
        AdapterLoad(max_loras=2, running=["chat"], loaded=["chat", "code"]),  # evicts code, never asked for
    ]
    assert costs(fleet) == [0.0, 0.0, 0.05, 0.55, 0.05, 0.05, 0.05]


def test_an_eviction_costs_by_how_popular_the_adapter_leaving_is():
    scorer = AdapterAffinityScorer(PARAMS, context())
    # Two replicas whose slots are full of idle adapters; the least recently used (first) one would go.
    slots = [AdapterLoad(max_loras=2, loaded=["hot", "x"]), AdapterLoad(max_loras=2, loaded=["cold", "y"])]

    def ask(adapter: str, times: int = 1) -> list[float]:
        for _ in range(times):
            view = make_view(running=[0, 0], adapters=slots, adapter=adapter)
            view.now = 1.0
            cost = list(scorer.cost(view))
        return cost

    ask("hot", 9)
    ask("cold", 1)
    load, evict = PARAMS.load_s, PARAMS.evict_s
    # For a new adapter asked for as often as `cold`: evicting `hot` costs nearly two evictions' worth,
    # evicting `cold` one.
    new = ask("new")
    assert new == [pytest.approx(load + evict * 2 * 9 / 10), pytest.approx(load + evict * 2 * 1 / 2)]
    assert new[1] < new[0]


def test_an_adapter_just_sent_counts_as_loaded_before_the_stats_say_so():
    view = make_view(running=[0, 0], adapters=[AdapterLoad(max_loras=2)] * 2, adapter="sql")
    scorer = AdapterAffinityScorer(PARAMS, context())
    view.now = 10.25
    view.fleet.states[1].sent_adapters["sql"] = 10.0
    assert list(scorer.cost(view)) == [0.05, 0.0]
    view.now = 12.0  # long enough for the stats to have shown it: they say it is not there
    assert list(scorer.cost(view)) == [0.05, 0.05]
    # Once the stats show it, they speak for it: an eviction they report afterwards counts at once.
    view.now = 10.25
    view.fleet.states[1].stats.adapters = AdapterLoad(max_loras=2, loaded=["sql"])
    assert list(scorer.cost(view)) == [0.05, 0.0]
    view.fleet.states[1].stats.adapters = AdapterLoad(max_loras=2, loaded=["a", "b"])
    assert list(scorer.cost(view)) == pytest.approx([0.05, 0.05])  # evicts `a`, never asked for


def test_requests_without_an_adapter_cost_nothing_anywhere():
    assert costs([AdapterLoad(max_loras=1, running=["chat"]), None], adapter=None) == [0.0, 0.0]
