from app.router.plugins.base import NoParams
from app.router.plugins.predicted_ttft_scorer import PredictedTTFTScorer
from tests.router.plugins.views import context, make_view


def test_a_cached_prefix_and_a_short_queue_predict_a_sooner_first_token():
    view = make_view(running=[1, 1, 6], blocks=[8, 0, 8])
    cost = PredictedTTFTScorer(NoParams(), context()).cost(view)
    assert cost[0] < cost[1] and cost[0] < cost[2]


def test_the_prediction_is_kept_on_the_view_for_the_decision():
    view = make_view(running=[0, 3])
    cost = PredictedTTFTScorer(NoParams(), context()).cost(view)
    assert view.predicted_ttft is cost
    prefill, load, _ = view.ttft_inputs
    assert load.tolist() == [0, 3] and prefill.tolist() == [view.request.num_prompt_tokens] * 2
