import numpy as np

from app.router.plugins.load_guard_filter import LoadGuardFilter, LoadGuardParams
from tests.router.plugins.views import context, make_view


def test_a_replica_far_above_the_least_loaded_is_kept_out():
    view = make_view(running=[2, 30, 7])
    guard = LoadGuardFilter(LoadGuardParams(load_ratio=2.0, load_slack=3), context())
    assert guard.mask(view, np.ones(3, dtype=bool)).tolist() == [True, False, True]  # bar: 2 x 2 + 3


def test_the_bar_is_set_by_the_replicas_earlier_filters_kept():
    view = make_view(running=[0, 10, 12])
    guard = LoadGuardFilter(LoadGuardParams(load_ratio=1.0, load_slack=2), context())
    passed = np.array([False, True, True])  # the idle one was ruled out (say, saturated)
    assert guard.mask(view, passed).tolist() == [True, True, True]
