"""The ingress side of an engine deployment: an engine client over a Serve handle.

Maps Serve's failure modes to errors a client can act on and retries a request whose replica
died before producing anything, so a lost replica does not lose requests.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from app.api.errors import APIError
from app.engines.protocol import EngineOutput, EngineRequest, EngineUnavailableError

logger = logging.getLogger(__name__)


class ServeEngineClient:
    """Streams a request from one of a deployment's engine replicas."""

    def __init__(self, handle: DeploymentHandle, *, retry_after_s: float = 1.0, max_attempts: int = 3) -> None:
        self._handle = handle.options(stream=True)
        self._retry_after_s = retry_after_s
        self._max_attempts = max_attempts

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        for attempt in range(1, self._max_attempts + 1):
            response = self._handle.generate.remote(request)
            produced = finished = failed = False
            try:
                async for output in response:
                    produced = True
                    finished = output.finished
                    yield output
                    if finished:
                        return
                raise APIError(503, "The engine replica closed the stream early; retry the request.",
                               retry_after_s=self._retry_after_s)
            except BackPressureError:
                failed = True
                raise APIError(
                    503,
                    "All engine replicas for this model are at their queue limit; retry after the indicated delay.",
                    code="engine_overloaded",
                    retry_after_s=self._retry_after_s,
                ) from None
            except DeploymentUnavailableError:
                failed = True
                raise APIError(503, "No engine replica for this model is available.",
                               retry_after_s=self._retry_after_s) from None
            except (RayActorError, EngineUnavailableError) as error:
                failed = True
                if produced or attempt == self._max_attempts:
                    raise replica_failed(self._retry_after_s) from None
                logger.warning("engine replica failed before answering %s (%s); retrying", request.request_id, error)
                request = without_failed_replica(request, error)
            finally:
                if not (finished or failed):
                    # The caller stopped reading (client gone): stop the engine request too.
                    # Best effort; an error here must not hide the one being raised.
                    with contextlib.suppress(Exception):
                        response.cancel()


def replica_failed(retry_after_s: float) -> APIError:
    """The error for a request whose engine failed after answering in part, or on its last attempt."""
    return APIError(503, "The engine replica serving this request failed; retry the request.",
                    retry_after_s=retry_after_s)


def without_failed_replica(request: EngineRequest, error: BaseException) -> EngineRequest:
    """The retry goes down the ranking past the replica that failed (when it is known), and
    recomputes the prompt instead of pulling a KV cache that the failed attempt may have consumed."""
    cause = getattr(error, "cause", None) or error
    failed = getattr(cause, "replica_id", None)
    update: dict[str, object] = {}
    if failed is not None:
        update["route"] = [replica for replica in request.route if replica != failed]
    if (request.kv_transfer_params or {}).get("do_remote_prefill"):
        update["kv_transfer_params"] = None
    return request.model_copy(update=update) if update else request
