from app.router.plugins.base import NoParams
from app.router.plugins.round_robin_picker import RoundRobinPicker
from tests.router.plugins.views import context, make_view


def test_each_request_starts_one_further_along():
    picker = RoundRobinPicker(NoParams(), context())
    view = make_view(running=[9, 0, 0])
    orders = [picker.rank(view, [], None).order for _ in range(4)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
