"""Serve request-router adapter: send each engine request where the gateway's scheduler said.

Serve picks the replica inside the caller's handle. The ingress has already ranked the engine
replicas (`EngineRequest.route`, by Serve replica id); this router hands Serve that ranking as one
group per replica, so Serve takes the first with room and falls back down the list when a replica is
full or gone. Replicas the scheduler does not know yet (just started) come last, together. A request
without a ranking (a batch job calling the engine handle directly) gets power-of-two choices.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import RequestRouter

from app.protocol.engine import EngineRequest


def _route_of(pending_request: PendingRequest | None) -> list[str]:
    if pending_request is None or not pending_request.args:
        return []
    request: Any = pending_request.args[0]
    return request.route if isinstance(request, EngineRequest) else []


class GatewayRequestRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        route = _route_of(pending_request)
        if not route:
            picks = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
            return [picks, candidate_replicas]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        ranked = [[by_id[replica_id]] for replica_id in route if replica_id in by_id]
        routed = set(route)
        unknown = [replica for replica in candidate_replicas if replica.replica_id.unique_id not in routed]
        if unknown:
            ranked.append(unknown)
        return ranked
