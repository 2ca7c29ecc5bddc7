"""The ingress side of external servers: stream each request straight from the chosen server.

The scheduler ranks the servers like any replicas; this client calls the first of the ranking over
HTTP and passes its output on as it comes (no Ray message per token). A server that cannot be
reached, or refuses with a server error, before sending anything is skipped for the next in the
ranking and kept at the back of later rankings for a while, so a dead server costs a request one
failed connection instead of failing it; the watcher takes it out of the candidates soon after.
A server that fails after sending part of an answer fails that request with a 503.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import httpx
from prometheus_client import Counter

from app.api.errors import APIError
from app.deployments.direct_stream import EngineServers, stream_from_server
from app.engines.protocol import EngineOutput, EngineRequest, EngineUnavailableError
from app.router.state import ClusterState
from app.tokenizer import PromptTokenizer

logger = logging.getLogger("ray.serve")


class ExternalEngineClient:
    def __init__(
        self,
        state: ClusterState,
        http: httpx.AsyncClient,
        *,
        model: str,
        served_model_name: str,
        tokenizer: PromptTokenizer | None,
        max_attempts: int = 3,
        avoid_failed_for_s: float = 3.0,
        retry_after_s: float = 1.0,
        streams: Counter | None = None,
    ) -> None:
        self._state = state
        # Without the model's tokenizer the servers get the prompt as text and tokenize it themselves.
        self._servers = EngineServers(http, served_model_name, tokenizer, servers_tokenize=tokenizer is None)
        self._model = model
        self._max_attempts = max_attempts
        self._avoid_failed_for_s = avoid_failed_for_s
        self._retry_after_s = retry_after_s
        self._streams = streams
        self._failed_until: dict[str, float] = {}

    def _order(self, route: list[str]) -> list[str]:
        """The ranking, with servers that just failed moved to the back (kept, in case all did)."""
        now = time.monotonic()
        self._failed_until = {rid: until for rid, until in self._failed_until.items() if until > now}
        if not self._failed_until:
            return route
        return [rid for rid in route if rid not in self._failed_until] + [
            rid for rid in route if rid in self._failed_until
        ]

    def _count(self, path: str) -> None:
        if self._streams is not None:
            self._streams.labels(self._model, path).inc()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        route = [rid for rid in self._order(list(request.route)) if rid in self._state.replicas]
        if not route:
            raise APIError(503, f"No server for model {self._model!r} is answering right now; the gateway keeps "
                           "checking them. Retry after the indicated delay.", code="no_healthy_endpoint",
                           retry_after_s=self._retry_after_s)
        tried = 0
        for replica_id in route[: self._max_attempts]:
            url = self._state.replicas[replica_id].info.endpoint_url or replica_id
            self._count("direct")
            tried += 1
            try:
                async with contextlib.aclosing(
                    stream_from_server(self._servers.get(url), request, replica_id, retry_after_s=self._retry_after_s)
                ) as outputs:
                    async for output in outputs:
                        yield output
                return
            except EngineUnavailableError as error:
                self._count("direct_failed")
                self._failed_until[replica_id] = time.monotonic() + self._avoid_failed_for_s
                logger.warning("server %s failed before answering %s (%s); trying the next one",
                               url, request.request_id, error)
        # Server addresses stay in the gateway's log; clients learn only that none could serve.
        raise APIError(503, f"No server for model {self._model!r} could take the request ({tried} tried). "
                       "Retry after the indicated delay.", retry_after_s=self._retry_after_s)
