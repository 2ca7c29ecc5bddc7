"""The admission stages in order: the first refusal wins, and stages that admitted are released."""

from __future__ import annotations

from collections.abc import Sequence

from app.router.admission.base import AdmissionRequest, AdmissionStage, FleetLoad, Refusal


class Admission:
    def __init__(self, stages: Sequence[AdmissionStage]) -> None:
        self.stages = list(stages)

    def admit(self, request: AdmissionRequest, fleet: FleetLoad) -> Refusal | None:
        for i, stage in enumerate(self.stages):
            refusal = stage.admit(request, fleet)
            if refusal is not None:
                for admitted in reversed(self.stages[:i]):
                    admitted.release(request)
                return refusal
        return None

    def release(self, request: AdmissionRequest) -> None:
        for stage in reversed(self.stages):
            stage.release(request)
