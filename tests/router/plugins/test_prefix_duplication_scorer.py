from app.router.plugins.base import NoParams
from app.router.plugins.prefix_duplication_scorer import PrefixDuplicationScorer
from tests.router.plugins.views import context, make_view


def test_copying_a_prefix_the_best_holder_has_costs_its_prefill():
    view = make_view(running=[0, 0, 0], blocks=[8, 4, 0])
    cost = PrefixDuplicationScorer(NoParams(), context()).cost(view)
    assert cost[0] == 0 < cost[1] < cost[2]
    assert cost[2] == 2 * cost[1]
