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
        AdapterLoad(max_loras=2, running=["chat"], loaded=["chat", "code"]),  # a load that evicts code
    ]
    assert costs(fleet) == [0.0, 0.0, 0.05, 0.55, 0.05, 0.05, pytest.approx(0.15)]


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
    assert list(scorer.cost(view)) == pytest.approx([0.05, 0.15])


def test_requests_without_an_adapter_cost_nothing_anywhere():
    assert costs([AdapterLoad(max_loras=1, running=["chat"]), None], adapter=None) == [0.0, 0.0]
