import numpy as np

from app.router.plugins.kv_saturation_filter import KVSaturationFilter, KVSaturationParams
from tests.router.plugins.views import context, make_view


def test_a_full_cache_with_a_queue_is_skipped_but_a_full_one_without_is_not():
    view = make_view(running=[4, 4, 4], waiting=[2, 0, 2], kv_usage=[1.0, 1.0, 0.5])
    mask = KVSaturationFilter(KVSaturationParams(), context()).mask(view, np.ones(3, dtype=bool))
    assert mask.tolist() == [False, True, True]


def test_a_lower_threshold_skips_sooner():
    view = make_view(running=[4, 4], waiting=[1, 1], kv_usage=[0.95, 0.5])
    mask = KVSaturationFilter(KVSaturationParams(saturated_kv_usage=0.9), context()).mask(view, np.ones(2, bool))
    assert mask.tolist() == [False, True]


def test_stale_stats_skip_nobody():
    view = make_view(running=[4, 4], waiting=[1, 1], kv_usage=[1.0, 1.0], fresh=False)
    assert KVSaturationFilter(KVSaturationParams(), context()).mask(view, np.ones(2, bool)).all()
