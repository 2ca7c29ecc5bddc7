"""Prefill/decode disaggregation on the request path.

Per request: pick the decode replica first (decode and mixed replicas, by prefix match and load),
because that is where the KV cache has to end up and where the tokens stream from. Split only when
that replica would otherwise compute more than `min_split_tokens` prompt tokens itself: short or
mostly cached prompts go straight to it. To split, pick a prefill replica (prefix match and load),
send it the client's body with max_tokens=1, no streaming and `do_remote_decode`, and give the
kv_transfer_params it returns to the decode replica, which pulls the KV cache (NIXL) or loads it
(shared storage). Both hops carry the client's own fields, so structured output and tools apply alike.

Failures never lose a request: a prefill that fails or times out means the decode replica computes
the prompt itself (no retry: the decode replica is the faster fallback), and the failed prefill
replica is left out of splits for a while; a decode replica that fails before its first token is
retried on another one, which recomputes the prompt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any, Literal

from app.gateway.metrics import DisaggregationMetrics
from app.gateway.relay import EngineReply, ForwardedCall
from app.gateway.routed import RoutedClient
from app.protocol.engine import EngineRequest, EngineRequestRejected, EngineUnavailableError

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

# The prefill hop computes the prompt and one token; nothing it returns reaches the client.
_PREFILL_BODY_CHANGES: dict[str, Any] = {
    "max_tokens": 1, "max_completion_tokens": None, "stream": False, "stream_options": None, "n": None,
    "logprobs": None, "top_logprobs": None, "stop": None, "stop_token_ids": None, "min_tokens": None,
    "echo": None,
}


def prefill_call(call: ForwardedCall) -> ForwardedCall:
    changes = dict(_PREFILL_BODY_CHANGES)
    if call.path.endswith("/completions") and "messages" not in call.body:
        changes.pop("top_logprobs")  # completions have no such field; leaving it out is the same
    return call.with_body(**changes, kv_transfer_params=dict(PREFILL_TRANSFER_PARAMS))


class SplitClient:
    def __init__(
        self,
        decode: RoutedClient,
        prefill: RoutedClient,
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

    @property
    def queued(self) -> int:
        """Requests waiting here for a decode replica with room."""
        return self._decode.queued

    async def open(self, request: EngineRequest, call: ForwardedCall) -> EngineReply:
        routing, decision = self._decode.route(request)
        path: SplitPath = "direct"
        params: dict[str, Any] | None = None
        if (
            decision is not None
            and decision.ranked  # empty while no engine serves the request's adapter yet: decode waits for one
            and self._decode.role_of(decision.replica_id) == "decode"
            and decision.uncached_tokens > self._min_split_tokens
        ):
            path, params = await self._run_prefill(request, call)
        self._metrics.requests.labels(self._model, path).inc()
        if params is not None:
            call = call.with_body(kv_transfer_params=params)
        # A decode that pulled its KV cache has a TTFT the cost model must not learn prefill speed from.
        return await self._decode.serve(request, call, routing, decision, learn=path != "split")

    async def _run_prefill(
        self, request: EngineRequest, call: ForwardedCall
    ) -> tuple[SplitPath, dict[str, Any] | None]:
        routing, decision = self._prefill.route(request)
        now = time.monotonic()
        if decision is not None:
            live = [r for r in decision.ranked if self._suspended.get(r, 0.0) <= now]
            decision = replace(decision, ranked=live[:1]) if live else None
        if decision is None:
            return "no_prefill", None
        started = time.monotonic()
        prefill = request.model_copy(update={"request_id": f"{request.request_id}-prefill"})
        try:
            async with asyncio.timeout(self._prefill_timeout_s):
                reply = await self._prefill.serve(prefill, prefill_call(call), routing, decision)
                reply.close()
        except (EngineUnavailableError, EngineRequestRejected, TimeoutError) as error:
            failed = decision.replica_id
            self._suspended[failed] = time.monotonic() + SUSPEND_FAILED_PREFILL_S
            logger.warning("prefill of %s on %s failed (%r); the decode replica computes the prompt itself, "
                           "and %s gets no prefill for %.0fs", request.request_id, failed, error, failed,
                           SUSPEND_FAILED_PREFILL_S)
            return "prefill_failed", None
        self._metrics.prefill_seconds.labels(self._model).observe(time.monotonic() - started)
        # NIXL returns where to pull from; the shared-storage connector returns nothing (decode finds
        # the blocks in the shared folder by the prompt's hash).
        return "split", (reply.body or {}).get("kv_transfer_params")
