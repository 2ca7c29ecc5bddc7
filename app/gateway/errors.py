"""What can go wrong between the gateway and its engines, as the API layer needs to tell it apart.

The gateway core raises these (and the engine protocol's EngineRequestRejected, the client's own
error); only the API layer turns them into OpenAI error bodies and status codes.
"""

from __future__ import annotations

from app.protocol.engine import EngineOverloaded, EngineUnavailableError

__all__ = ["EngineFailed", "EngineOverloaded", "NoReplicaAvailable"]


class NoReplicaAvailable(EngineUnavailableError):
    """No engine of the model is registered or answering right now (503, no_healthy_endpoint)."""


class EngineFailed(EngineUnavailableError):
    """The engines tried failed before answering, or the one answering failed mid-answer (503)."""
