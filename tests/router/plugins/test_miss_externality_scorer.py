from app.router.plugins.base import NoParams
from app.router.plugins.miss_externality_scorer import MissExternalityScorer
from tests.router.plugins.views import context, make_view


def test_a_miss_costs_in_proportion_to_the_requests_it_stalls():
    view = make_view(running=[0, 2, 4], blocks=[0, 0, 0])
    cost = MissExternalityScorer(NoParams(), context()).cost(view)
    assert cost[0] == 0 and cost[2] == 2 * cost[1] > 0


def test_a_hit_stalls_nobody_much():
    view = make_view(running=[4, 4], blocks=[8, 0], prompt_blocks=8)
    cost = MissExternalityScorer(NoParams(), context()).cost(view)
    assert cost[0] < cost[1] / 10
