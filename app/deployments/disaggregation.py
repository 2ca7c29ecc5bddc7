"""Prefill/decode disaggregation on the request path.

Per request: pick the decode replica first (decode and mixed replicas, by prefix match and load),
because that is where the KV cache has to end up and where the tokens stream from. Split only when
that replica would otherwise compute more than `min_split_tokens` prompt tokens itself: short or
mostly cached prompts go straight to it. To split, pick a prefill replica (prefix match and load),
send it the request with max_tokens=1 and `do_remote_decode`, and give the kv_transfer_params it
returns to the decode replica, which pulls the KV cache (NIXL) or loads it (shared storage).

Failures never lose a request: a prefill that fails or times out means the decode replica computes
the prompt itself (no retry: the decode replica is the faster fallback), and the failed prefill
replica is left out of splits for a while; a decode replica that fails before its first token is retried on another one
(ServeEngineClient drops the failed replica and the hand-off, so the retry recomputes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram

from app.api.errors import APIError
from app.deployments.routing import RoutedEngineClient
from app.engines.protocol import EngineOutput, EngineRequest, EngineRequestRejected, EngineUnavailableError

logger = logging.getLogger("ray.serve")

SplitPath = Literal["direct", "split", "prefill_failed", "no_prefill"]

# vLLM's NixlConnector protocol: ask the prefill engine to keep the blocks for a remote decode.
PREFILL_TRANSFER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
SUSPEND_FAILED_PREFILL_S = 30.0
_PREFILL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class DisaggregationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gateway_disaggregation_requests",
            "Requests of split models by path: direct (below the threshold or a mixed replica), split, "
            "prefill_failed (decode computed the prompt), no_prefill (no prefill replica known).",
            ["model", "path"], registry=registry,
        )
        self.prefill_seconds = Histogram(
            "gateway_disaggregation_prefill_seconds",
            "The split hop: from sending the prefill request to having its kv_transfer_params.",
            ["model"], buckets=_PREFILL_BUCKETS, registry=registry,
        )


class DisaggregatedEngineClient:
    def __init__(
        self,
        decode: RoutedEngineClient,
        prefill: RoutedEngineClient,
        *,
        model: str,
        min_split_tokens: int,
        prefill_timeout_s: float,
        metrics: DisaggregationMetrics,
    ) -> None:
        self._decode = decode
        self._prefill = prefill
        self._model = model
        self._min_split_tokens = min_split_tokens
        self._prefill_timeout_s = prefill_timeout_s
        self._metrics = metrics
        self._suspended: dict[str, float] = {}
        """Prefill replicas that just failed, until when. Without this, requests would keep going to a
        dead replica (and wait for Serve to replace it) until the state actor times it out."""

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        routing, decision = self._decode.route(request)
        path: SplitPath = "direct"
        params: dict[str, Any] | None = None
        if (
            decision is not None
            and self._decode.role_of(decision.replica_id) == "decode"
            and decision.uncached_tokens > self._min_split_tokens
        ):
            path, params = await self._run_prefill(request)
        self._metrics.requests.labels(self._model, path).inc()
        if params is not None:
            request = request.model_copy(update={"kv_transfer_params": params})
        # A decode that pulled its KV cache has a TTFT the cost model must not learn prefill speed from.
        async with contextlib.aclosing(
            self._decode.serve(request, routing, decision, learn=path != "split")
        ) as outputs:
            async for output in outputs:
                yield output

    async def _run_prefill(self, request: EngineRequest) -> tuple[SplitPath, dict[str, Any] | None]:
        routing, decision = self._prefill.route(request)
        now = time.monotonic()
        if decision is not None:
            live = [r for r in decision.ranked if self._suspended.get(r, 0.0) <= now]
            decision = replace(decision, ranked=live) if live else None
        if decision is None:
            return "no_prefill", None
        prefill_request = request.model_copy(update={
            "request_id": f"{request.request_id}-prefill",
            "sampling": request.sampling.model_copy(
                update={"max_tokens": 1, "logprobs": None, "stop": [], "stop_token_ids": []}
            ),
            "kv_transfer_params": dict(PREFILL_TRANSFER_PARAMS),
        })
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._prefill_timeout_s):
                last: EngineOutput | None = None
                async with contextlib.aclosing(self._prefill.serve(prefill_request, routing, decision)) as outputs:
                    async for output in outputs:
                        last = output
        except (APIError, EngineUnavailableError, EngineRequestRejected, TimeoutError) as error:
            failed = decision.replica_id
            self._suspended[failed] = time.monotonic() + SUSPEND_FAILED_PREFILL_S
            logger.warning("prefill of %s on %s failed (%r); the decode replica computes the prompt itself, "
                           "and %s gets no prefill for %.0fs", request.request_id, failed, error, failed,
                           SUSPEND_FAILED_PREFILL_S)
            return "prefill_failed", None
        if last is None or not last.finished:
            return "prefill_failed", None
        self._metrics.prefill_seconds.labels(self._model).observe(time.monotonic() - started)
        # NIXL returns where to pull from; the shared-storage connector returns nothing (decode finds
        # the blocks in the shared folder by the prompt's hash).
        return "split", last.kv_transfer_params
