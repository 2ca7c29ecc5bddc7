from collections import Counter

from app.router.plugins.base import NoParams
from app.router.plugins.power_of_two_picker import PowerOfTwoPicker
from tests.router.plugins.views import context, make_view


def test_the_busiest_replica_never_wins_and_the_rest_follow_by_load():
    picker = PowerOfTwoPicker(NoParams(), context(seed=1))
    view = make_view(running=[5, 1, 3, 9])
    firsts = Counter()
    for _ in range(200):
        order = picker.rank(view, [], None).order
        assert sorted(order) == [0, 1, 2, 3]
        firsts[order[0]] += 1
    assert firsts[3] == 0 and firsts[1] > firsts[0]
