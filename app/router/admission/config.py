"""Admission stages named in the gateway config, checked against the registry when the config is read."""

from __future__ import annotations

from typing import Any, ClassVar

from app.router.admission.registry import STAGES
from app.router.config import PluginSpec


class AdmissionStageSpec(PluginSpec):
    _kind: ClassVar[str] = "admission stage"

    @classmethod
    def _plugins(cls) -> dict[str, Any]:
        return STAGES
