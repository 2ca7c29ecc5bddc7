import numpy as np

from app.router.plugins.base import FilterResult
from app.router.plugins.load_guard_filter import LoadGuardFilter, LoadGuardParams
from app.router.plugins.lowest_cost_picker import LowestCostParams, LowestCostPicker
from tests.router.plugins.views import context, make_view


def picker(quantum: float = 0.001) -> LowestCostPicker:
    return LowestCostPicker(LowestCostParams(tie_quantum_s=quantum), context())


def test_the_cheapest_replica_first_and_every_replica_ranked():
    view = make_view(running=[0, 0, 0])
    ranking = picker().rank(view, [], np.array([0.3, 0.1, 0.2]))
    assert ranking.order == [1, 2, 0]


def test_replicas_a_filter_left_out_come_last_not_never():
    view = make_view(running=[0, 0, 0], blocks=[8, 0, 0])
    guard = LoadGuardFilter(LoadGuardParams(), context())
    mask = np.array([False, True, True])
    result = FilterResult(mask=mask, kept=mask, filter=guard, bypassed=False)
    ranking = picker().rank(view, [result], np.array([0.0, 0.2, 0.1]))
    assert ranking.order == [2, 1, 0] and ranking.reason == "guard"


def test_ties_break_the_same_way_for_the_same_prompt_and_spread_distinct_prompts():
    firsts = set()
    for last_block in range(40):
        view = make_view(running=[0] * 4)
        view.request = view.request.__class__("m", [last_block], 16, 16)
        first = picker().rank(view, [], np.zeros(4)).order[0]
        assert picker().rank(view, [], np.zeros(4)).order[0] == first
        firsts.add(first)
    assert firsts == {0, 1, 2, 3}


def test_the_reason_says_whether_the_prefix_won():
    view = make_view(running=[0, 0], blocks=[8, 0])
    assert picker().rank(view, [], np.array([0.0, 1.0])).reason == "prefix"
    assert picker().rank(view, [], np.array([1.0, 0.0])).reason == "load"
    assert picker().rank(make_view(running=[0, 0]), [], np.zeros(2)).reason == "no_prefix"
    assert picker().rank(make_view(running=[0, 0], fresh=False), [], np.zeros(2)).reason == "stale_state"
