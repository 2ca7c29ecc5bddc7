"""Stream a routed request straight from the chosen engine's own HTTP server.

Through a Serve handle, every piece of output crosses a Ray hop (engine replica -> ingress) on top
of the engine's own loopback HTTP. Engines that publish an OpenAI server (real vLLM) are called
directly instead: the ingress already picked the replica, so the hop through the engine replica
adds nothing but latency and CPU. Measured on 2 cores with the tiny model, it was the larger half
of the gateway's added TTFT (benchmarks/README.md, "Gateway overhead on real vLLM").

Engines without a server (simulated) and endpoints this ingress cannot reach (a loopback server on
another node) go through the handle as before. A direct attempt that fails before any output falls
back to the handle, past the failed replica, so a dead server loses no request.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
from prometheus_client import CollectorRegistry, Counter

from app.api.serving import EngineClient
from app.deployments.engine_client import replica_failed, without_failed_replica
from app.engines.external.text_client import OpenAITextClient
from app.engines.protocol import EngineOutput, EngineRequest, EngineUnavailableError
from app.engines.vllm.client import VLLMCompletionsClient, token_text
from app.router.state import ClusterState, ReplicaState
from app.tokenizer import PromptTokenizer

logger = logging.getLogger("ray.serve")


def engine_streams_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "gateway_engine_streams",
        "Engine requests by how they reached the engine: direct (HTTP to its own server), serve (through the "
        "engine replica), direct_failed (the direct attempt failed before any output).",
        ["model", "path"], registry=registry,
    )


def new_http_client(connect_timeout_s: float = 5.0) -> httpx.AsyncClient:
    # Streams can idle for long between tokens under load; only connecting is bounded.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=connect_timeout_s),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
    )


def reachable_from(replica: ReplicaState, node_id: str | None) -> str | None:
    """The replica's server URL if this node can reach it: loopback only on the same node."""
    url = replica.info.endpoint_url
    if url is None:
        return None
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return url if node_id is not None and replica.info.node_id == node_id else None
    return url


ServerClient = VLLMCompletionsClient | OpenAITextClient


class EngineServers:
    """One client per engine server URL, sharing one HTTP connection pool.

    `servers_tokenize`: the gateway has no tokenizer for the model, so prompts go out as text or
    messages (OpenAITextClient) instead of token ids.
    """

    def __init__(
        self, http: httpx.AsyncClient, served_model_name: str, tokenizer: PromptTokenizer | None,
        *, servers_tokenize: bool = False,
    ) -> None:
        self._http = http
        self._model = served_model_name
        self._tokenizer = tokenizer
        self._servers_tokenize = servers_tokenize
        self._clients: dict[str, ServerClient] = {}

    def get(self, url: str) -> ServerClient:
        client = self._clients.get(url)
        if client is None:
            client = (OpenAITextClient(self._http, url, self._model) if self._servers_tokenize
                      else VLLMCompletionsClient(self._http, url, self._model, decode=self._decode))
            self._clients[url] = client
        return client

    def _decode(self, token_id: int) -> str:
        return token_text(self._tokenizer, token_id)


async def stream_from_server(
    server: ServerClient, request: EngineRequest, replica_id: str, *, one_shot: bool = False,
    retry_after_s: float = 1.0,
) -> AsyncIterator[EngineOutput]:
    """One attempt at a request on one server. A failure before any output raises
    EngineUnavailableError carrying `replica_id` (the caller may try elsewhere); after some output
    it is the client's error, since the answer cannot be restarted on another server."""
    produced = False
    try:
        if one_shot:
            output = await server.complete(request)
            output.replica_id = replica_id
            yield output
            return
        # Closing this generator early (client gone) closes the HTTP stream: vLLM aborts the request.
        async with contextlib.aclosing(server.stream(request)) as outputs:
            async for output in outputs:
                if not produced:
                    produced = True
                    output.replica_id = replica_id
                yield output
    except EngineUnavailableError as error:
        if produced:
            raise replica_failed(retry_after_s) from None
        error.replica_id = replica_id  # type: ignore[attr-defined]
        raise


class DirectStreamEngineClient:
    """An engine client that calls the first replica of the request's route over HTTP when it can.

    `fallback` is the Serve-handle client for the same deployment. `retry` says whether a direct
    attempt that failed before any output goes on through the handle (prefill requests do not:
    the decode replica computing the prompt is the faster fallback).
    """

    def __init__(
        self,
        fallback: EngineClient,
        state: ClusterState,
        http: httpx.AsyncClient,
        *,
        served_model_name: str,
        tokenizer: PromptTokenizer | None,
        node_id: str | None,
        retry: bool = True,
        retry_after_s: float = 1.0,
        streams: Counter | None = None,
    ) -> None:
        self._streams = streams
        self._fallback = fallback
        self._state = state
        self._servers = EngineServers(http, served_model_name, tokenizer)
        self._model = served_model_name
        self._node_id = node_id
        self._retry = retry
        self._retry_after_s = retry_after_s

    def _count(self, path: str) -> None:
        if self._streams is not None:
            self._streams.labels(self._model, path).inc()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        replica = self._state.replicas.get(request.route[0]) if request.route else None
        url = reachable_from(replica, self._node_id) if replica is not None else None
        if replica is None or url is None:
            self._count("serve")
            async with contextlib.aclosing(self._fallback.generate(request)) as outputs:
                async for output in outputs:
                    yield output
            return
        self._count("direct")
        replica_id = replica.replica_id
        # vLLM returns kv_transfer_params only on a non-streamed answer.
        one_shot = bool((request.kv_transfer_params or {}).get("do_remote_decode")) or replica.info.role == "prefill"
        try:
            async with contextlib.aclosing(
                stream_from_server(self._servers.get(url), request, replica_id, one_shot=one_shot,
                                   retry_after_s=self._retry_after_s)
            ) as outputs:
                async for output in outputs:
                    yield output
            return
        except EngineUnavailableError as error:
            self._count("direct_failed")
            if not self._retry:
                raise
            logger.warning("engine server %s failed before answering %s (%s); retrying through Serve",
                           url, request.request_id, error)
            request = without_failed_replica(request, error)
        async with contextlib.aclosing(self._fallback.generate(request)) as outputs:
            async for output in outputs:
                yield output
