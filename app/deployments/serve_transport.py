"""Reaching engine replicas through their Serve handle, for what HTTP cannot reach.

An ingress relays answers straight from engines' servers; this is the other way in: the engine replica
forwards the call to its own server and streams the answer back over Ray (`EngineServer.relay`). Used
for servers this ingress cannot reach (a loopback server on another node), while no replica has
registered with the router yet, and for the baseline policies that pick the replica inside Serve's
handle (power_of_two, ray_prefix_cache_affinity). Maps Serve's failure modes to the gateway core's errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from app.deployments.engine_replica import RelayHead
from app.gateway.errors import EngineOverloaded, NoReplicaAvailable
from app.gateway.relay import EngineReply, ForwardedCall, accept
from app.protocol.engine import EngineRequest, EngineUnavailableError
from app.router.state import ReplicaState
from app.upstream import UpstreamError


class ServeTransport:
    """One engine deployment's replicas, through its handle (Serve's request router picks, honouring the
    request's ranking when the gateway's router is installed)."""

    path = "serve"

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle.options(stream=True)

    async def open(
        self, request: EngineRequest, call: ForwardedCall, replica: ReplicaState | None, ranking: list[str]
    ) -> EngineReply:
        # The ranking rides on the request: the gateway's Serve request router takes the first with room.
        response = self._handle.relay.remote(request.model_copy(update={"route": ranking}), call)
        try:
            head = await response.__anext__()
        except BackPressureError:
            raise EngineOverloaded("All engine replicas for this model are at their queue limit; retry after the "
                                   "indicated delay.") from None
        except DeploymentUnavailableError:
            raise NoReplicaAvailable("No engine replica for this model is available.") from None
        except RayActorError as error:
            raise EngineUnavailableError(f"the engine replica failed: {error}") from None
        except StopAsyncIteration:
            raise EngineUnavailableError("the engine replica closed the stream before answering") from None
        except BaseException:
            with contextlib.suppress(Exception):
                response.cancel()
            raise
        assert isinstance(head, RelayHead)

        async def pieces() -> AsyncIterator[bytes]:
            try:
                async for piece in response:
                    yield piece
            except RayActorError as error:
                raise UpstreamError(f"the engine replica failed: {error}", responded=True) from None

        def close() -> None:
            with contextlib.suppress(Exception):  # best effort: an error here must not hide another
                response.cancel()

        return await accept(head.status, pieces(), call, head.replica_id, close=close)
