"""Admission stages by the names the gateway config uses.

Adding a stage: its own module in this folder and one line in `STAGES` (or one `register_stage` call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.router.admission.base import AdmissionStage
from app.router.admission.inflight_limit import InflightLimitStage
from app.router.plugins.registry import add_to_table

STAGES: dict[str, type[AdmissionStage]] = {
    "inflight_limit": InflightLimitStage,
}


def register_stage(name: str, stage: type[AdmissionStage]) -> None:
    add_to_table(STAGES, "admission stage", name, stage)


def build_stages(specs: Sequence[Any], *, retry_after_s: float) -> list[AdmissionStage]:
    """The configured stages (AdmissionStageSpec), built in order."""
    stages = []
    for spec in specs:
        stage = STAGES[spec.type]
        stages.append(stage(stage.Params.model_validate(spec.parameters), retry_after_s=retry_after_s))
    return stages
