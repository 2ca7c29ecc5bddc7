"""What an admission stage sees and answers: the request (model, priority, tenant) and the
fleet serving its model (replicas, load, KV usage, the gateway's own queue), before any heavy work.

A stage admits (returns None) or refuses with a status the API layer turns into an OpenAI error; an
admitted request is released through every stage that admitted it when it ends, however it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    model: str
    """The canonical served model name."""
    endpoint: str
    priority: int = 0
    """Lower is more important, as vLLM's `priority`."""
    tenant: str | None = None
    """Who is asking (the OpenAI `user` field), for per-tenant stages."""
    stream: bool = False


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """The fleet serving one model, as this ingress replica sees it now."""

    replicas: int
    running: int
    waiting: int
    inflight: int
    """This ingress replica's requests on the model's engines."""
    queued: int
    """Requests waiting at this ingress replica for an engine with room."""
    kv_cache_usage: float
    """Mean KV-cache usage over the replicas (0..1)."""
    fresh: bool
    """Whether the stats behind this are recent; stale stats should not refuse anyone."""


class FleetLoad(Protocol):
    def of(self, model: str) -> ModelLoad:
        """The model's load; computed on demand, so stages that do not ask cost nothing."""
        ...


class UnknownFleet:
    """For servings without a fleet of their own (an engine's own server): nothing known, nothing refused."""

    def of(self, model: str) -> ModelLoad:
        return ModelLoad(replicas=0, running=0, waiting=0, inflight=0, queued=0, kv_cache_usage=0.0, fresh=False)


@dataclass(frozen=True, slots=True)
class Refusal:
    status: Literal[429, 503]
    code: str
    message: str
    retry_after_s: float | None = None


class AdmissionStage(Protocol):
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: BaseModel, *, retry_after_s: float) -> None: ...

    def admit(self, request: AdmissionRequest, fleet: FleetLoad) -> Refusal | None: ...

    def release(self, request: AdmissionRequest) -> None:
        """The admitted request ended."""
        ...
