"""What can go wrong between the gateway and its engines, as the API layer needs to tell it apart.

The gateway core raises these (and the engine protocol's EngineRequestRejected, the client's own
error); only the API layer turns them into OpenAI error bodies and status codes.
"""

from __future__ import annotations

from app.engines.protocol import EngineUnavailableError


class NoReplicaAvailable(EngineUnavailableError):
    """No engine of the model is registered or answering right now (503, no_healthy_endpoint)."""


class EngineOverloaded(EngineUnavailableError):
    """Every engine tried refused the request for load, or the gateway's own queue for the model is full
    (503 engine_overloaded, with Retry-After)."""


class EngineFailed(EngineUnavailableError):
    """The engines tried failed before answering, or the one answering failed mid-answer (503)."""


def is_overload(error: BaseException) -> bool:
    return isinstance(error, EngineOverloaded) or bool(getattr(error, "overloaded", False))
