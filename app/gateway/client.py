"""The gateway core's two protocols: an engine client (where a model's requests go) and a transport
(one way to reach engine replicas).

The API layer calls `EngineClient.open` and gets the engine's answer as bytes, or one of the errors
of app/gateway/errors.py (or the engine's own EngineRequestRejected); it alone turns those into
OpenAI error bodies. Clients are built in one place, app/gateway/client_builder.py.
"""

from __future__ import annotations

from typing import Protocol

from app.gateway.relay import EngineReply, ForwardedCall
from app.protocol.engine import EngineRequest
from app.router.state import ReplicaState


class EngineClient(Protocol):
    """Where one model's requests go: ranked over its replicas, split into prefill and decode, or handed
    to a transport that picks."""

    async def open(self, request: EngineRequest, call: ForwardedCall) -> EngineReply:
        """The engine's answer once it has accepted the request (its first output, or a whole answer)."""
        ...


class Transport(Protocol):
    """A way to reach engine replicas. `replica` None: the transport picks (no ranking yet); `ranking`:
    the replicas to fall back on, in order, for a transport that can (the replica first)."""

    path: str
    """How the metric `gateway_engine_streams` names it: direct (HTTP) or serve (a Serve handle)."""

    async def open(
        self, request: EngineRequest, call: ForwardedCall, replica: ReplicaState | None, ranking: list[str]
    ) -> EngineReply: ...
