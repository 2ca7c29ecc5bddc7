"""Admission stages: the pipeline's order and releases, and a stage added through the registry alone."""

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from app.config import IngressConfig
from app.router.admission import Admission, AdmissionRequest, ModelLoad, Refusal
from app.router.admission.inflight_limit import InflightLimitParams, InflightLimitStage
from app.router.admission.registry import STAGES, build_stages, register_stage


class Fleet:
    def __init__(self, kv_cache_usage: float) -> None:
        self.asked = 0
        self.kv_cache_usage = kv_cache_usage

    def of(self, model: str) -> ModelLoad:
        self.asked += 1
        return ModelLoad(replicas=2, running=8, waiting=3, inflight=4, queued=0,
                         kv_cache_usage=self.kv_cache_usage, fresh=True)


class ShedBelowPriorityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_kv_usage: float


class ShedSheddableWhenFull:
    """A toy stage: requests with priority above 0 are refused while the model's caches are full."""

    Params = ShedBelowPriorityParams

    def __init__(self, params: ShedBelowPriorityParams, *, retry_after_s: float) -> None:
        self.max_kv_usage = params.max_kv_usage
        self.retry_after_s = retry_after_s
        self.admitted = 0

    def admit(self, request: AdmissionRequest, fleet) -> Refusal | None:
        if request.priority > 0 and fleet.of(request.model).kv_cache_usage > self.max_kv_usage:
            return Refusal(503, "shed", "sheddable traffic is refused while the fleet is full", self.retry_after_s)
        self.admitted += 1
        return None

    def release(self, request: AdmissionRequest) -> None:
        self.admitted -= 1


@pytest.fixture(autouse=True)
def toy_stage():
    register_stage("shed_sheddable_when_full", ShedSheddableWhenFull)
    yield
    STAGES.pop("shed_sheddable_when_full")


def test_a_registered_stage_named_in_the_config_sees_the_request_and_the_fleet():
    config = IngressConfig.model_validate(
        {"admission": [{"type": "shed_sheddable_when_full", "parameters": {"max_kv_usage": 0.9}}]}
    )
    [stage] = build_stages(config.admission, retry_after_s=2.0)
    admission = Admission([stage])
    critical = AdmissionRequest("m", "chat", priority=0)
    sheddable = AdmissionRequest("m", "chat", priority=1)
    full, roomy = Fleet(0.95), Fleet(0.5)
    assert admission.admit(critical, full) is None and full.asked == 0  # the fleet is read only on demand
    assert admission.admit(sheddable, full) == Refusal(503, "shed", "sheddable traffic is refused while the "
                                                                    "fleet is full", 2.0)
    assert admission.admit(sheddable, roomy) is None


def test_a_refusal_releases_the_stages_that_had_admitted():
    limit = InflightLimitStage(InflightLimitParams(max_inflight_requests=10), retry_after_s=1.0)
    toy = ShedSheddableWhenFull(ShedBelowPriorityParams(max_kv_usage=0.9), retry_after_s=1.0)
    admission = Admission([limit, toy])
    assert admission.admit(AdmissionRequest("m", "chat", priority=1), Fleet(0.99)) is not None
    assert limit.inflight == 0
    ticket = AdmissionRequest("m", "chat")
    assert admission.admit(ticket, Fleet(0.99)) is None and (limit.inflight, toy.admitted) == (1, 1)
    admission.release(ticket)
    assert (limit.inflight, toy.admitted) == (0, 0)


def test_an_unknown_stage_or_parameter_is_refused_naming_it():
    with pytest.raises(ValidationError, match="unknown admission stage 'nope'; known admission stages: "):
        IngressConfig.model_validate({"admission": [{"type": "nope"}]})
    with pytest.raises(ValidationError, match="max_kv_usage: Field required"):
        IngressConfig.model_validate({"admission": [{"type": "shed_sheddable_when_full"}]})
