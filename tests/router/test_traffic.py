from collections import Counter

import pytest

from app.router.traffic import TrafficError, TrafficSplit, TrafficSplitter, check_splits


def split(**weights: float) -> TrafficSplit:
    return TrafficSplit(targets=[{"target": t, "weight": w} for t, w in weights.items()])


def test_a_90_10_split_is_90_10_in_every_window():
    splitter = TrafficSplitter({"prod": split(v1=90, v2=10)})
    picks = [splitter.pick("prod") for _ in range(2000)]
    assert Counter(picks) == {"v1": 1800, "v2": 200}
    for start in range(0, 2000, 100):
        assert Counter(picks[start:start + 100])["v2"] == 10
    assert splitter.pick("not-a-split") is None


def test_sticky_callers_keep_their_target():
    splitter = TrafficSplitter({"prod": TrafficSplit(targets=[{"target": "v1", "weight": 50},
                                                              {"target": "v2", "weight": 50}],
                                                     sticky_header="X-Session-Id", sticky_user=True)})
    for caller in range(50):
        first = splitter.pick("prod", headers={"x-session-id": f"s{caller}"})
        assert all(splitter.pick("prod", headers={"x-session-id": f"s{caller}"}) == first for _ in range(10))
    by_user = {splitter.pick("prod", user=f"u{i}") for i in range(100)}
    assert by_user == {"v1", "v2"}, "callers spread over the targets"
    assert len({splitter.pick("prod", user="same") for _ in range(20)}) == 1


def test_a_sticky_90_10_split_over_2000_callers_lands_within_2_points():
    splitter = TrafficSplitter({"prod": TrafficSplit(targets=[{"target": "v1", "weight": 90},
                                                              {"target": "v2", "weight": 10}],
                                                     sticky_header="x-session-id")})
    picks = Counter(splitter.pick("prod", headers={"x-session-id": f"session-{i}"}) for i in range(2000))
    assert abs(picks["v2"] / 2000 - 0.10) <= 0.02, picks


def test_zero_weight_targets_get_nothing_and_bad_splits_are_refused():
    splitter = TrafficSplitter({"prod": split(v1=0, v2=5)})
    assert {splitter.pick("prod") for _ in range(50)} == {"v2"}
    with pytest.raises(ValueError, match="more than 0"):
        split(v1=0, v2=0)
    with pytest.raises(TrafficError, match="unknown target 'v3'"):
        check_splits({"prod": split(v1=1, v3=1)}, ["v1", "v2"])
    with pytest.raises(TrafficError, match="takes the name of a served model"):
        check_splits({"v1": split(v2=1)}, ["v1", "v2"])
