"""Admission: whether the gateway takes a request now or asks the client to come back.

Stages (one module each, named in `registry.py`) see the request and the fleet serving its model; the
in-flight limit is the first; priority classes and flow control are stages too.
"""

from app.router.admission.base import AdmissionRequest, AdmissionStage, FleetLoad, ModelLoad, Refusal, UnknownFleet
from app.router.admission.inflight_limit import InflightLimit
from app.router.admission.pipeline import Admission

__all__ = [
    "Admission", "AdmissionRequest", "AdmissionStage", "FleetLoad", "InflightLimit", "ModelLoad", "Refusal",
    "UnknownFleet",
]
