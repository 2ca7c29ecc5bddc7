"""Routing profiles: composing plugins by name, and adding one through the registry alone."""

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from app.router.config import RoutingConfig, builtin_profile
from app.router.fleet import FleetView
from app.router.plugins import registry
from app.router.plugins.base import PluginContext
from tests.router.test_scheduler import fleet, prompt, route


class ToyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    avoid: str


class AvoidOneReplicaScorer:
    """A toy scorer: one named replica costs a second more than the others."""

    Params = ToyParams

    def __init__(self, params: ToyParams, context: PluginContext) -> None:
        self.avoid = params.avoid

    def cost(self, view: FleetView) -> np.ndarray:
        return np.array([1.0 if rid == self.avoid else 0.0 for rid in view.fleet.ids])


@pytest.fixture(autouse=True)
def toy_scorer():
    registry.register_scorer("avoid_one_replica", AvoidOneReplicaScorer)
    yield
    registry.SCORERS.pop("avoid_one_replica")


def with_toy(avoid: str, weight: float = 1.0) -> dict:
    base = builtin_profile(RoutingConfig()).model_dump()
    base["scorers"].append({"type": "avoid_one_replica", "weight": weight, "parameters": {"avoid": avoid}})
    return {"profile": {**base, "name": "prefix_aware_avoiding"}}


def test_a_registered_scorer_named_in_the_config_changes_the_choice():
    plain = route(fleet(), prompt(1, 0)).replica_id
    decision = route(fleet(**with_toy(avoid=plain)), prompt(1, 0))
    assert decision.replica_id != plain
    assert decision.policy == "prefix_aware_avoiding"
    # At weight 0 it is there but decides nothing.
    assert route(fleet(**with_toy(avoid=plain, weight=0.0)), prompt(1, 0)).replica_id == plain


def test_a_profile_composed_like_the_builtin_decides_like_it():
    composed = {"profile": builtin_profile(RoutingConfig()).model_dump()}
    a, b = fleet(), fleet(**composed)
    for g in range(6):
        for q in range(4):
            da, db = route(a, prompt(g, q), first_token=True), route(b, prompt(g, q), first_token=True)
            assert (da.ranked, da.reason, da.predicted_ttft_s) == (db.ranked, db.reason, db.predicted_ttft_s)


def test_a_profile_alone_makes_the_policy_custom():
    config = RoutingConfig.model_validate(with_toy(avoid="r0"))
    assert config.policy == "custom" and config.ranks_at_gateway


@pytest.mark.parametrize(
    ("routing", "says"),
    [
        ({"profile": {"scorers": [{"type": "nope"}]}},
         "unknown scorer 'nope'; known scorers: adapter_affinity, avoid_one_replica"),
        ({"profile": {"filters": [{"type": "load_guard", "parameters": {"load_ratoi": 2}}]}},
         "filter 'load_guard' parameters: load_ratoi: Extra inputs are not permitted"),
        ({"profile": {"filters": [{"type": "load_guard", "parameters": {"load_ratio": 0.5}}]}},
         "load_ratio: Input should be greater than or equal to 1"),
        ({"profile": {"picker": {"type": "best"}}}, "unknown picker 'best'"),
        ({"profile": {"scorers": [{"type": "predicted_ttft", "weight": -1}]}}, "greater than or equal to 0"),
        ({"profile": {"scorers": [{"type": "predicted_ttft", "wieght": 2}]}}, "wieght"),
        ({"policy": "round_robin", "profile": {}}, "leave out `policy: round_robin`"),
        ({"policy": "custom"}, "routing.policy custom needs routing.profile"),
    ],
)
def test_a_wrong_profile_is_refused_naming_the_problem(routing, says):
    with pytest.raises(ValidationError, match=None) as error:
        RoutingConfig.model_validate(routing)
    assert says in str(error.value)
