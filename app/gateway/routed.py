"""The scheduler on the request path: rank a model's replicas, send the request to the best one that
takes it, and keep the books (in-flight load, speculative prefix entries, observed TTFT).

`RoutedClient` asks the local scheduler for a ranking (local memory only, no remote call), then tries
the replicas in that order: a replica that cannot be reached, or refuses before any output, is skipped
for the next one and kept at the back of later rankings for a while, so a dead server costs a request
one failed connection instead of failing it. Replicas are reached through a transport: HTTP to the
engine's own server when this process can reach it, else whatever the deployment layer provides (the
engine replica's Serve handle).

A replica with `max_ongoing` of this router's requests in flight takes no more; when every candidate
is that full, requests wait here in arrival order (`max_queued` of them, then 503 engine_overloaded)
and are routed afresh when a slot frees: a clear queue at the gateway, not TTFTs growing without bound
in the engines' queues.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import Counter

from app.gateway.client import Transport
from app.gateway.errors import EngineFailed, EngineOverloaded, NoReplicaAvailable
from app.gateway.metrics import RouterMetrics
from app.gateway.relay import EngineReply, ForwardedCall, open_on_server
from app.protocol.engine import EngineRequest, EngineUnavailableError
from app.router.scheduler import Decision, RoutingRequest, Scheduler
from app.router.state import ReplicaRole, ReplicaState
from app.upstream import UpstreamPool

logger = logging.getLogger("ray.serve")


class HTTPTransport:
    """Straight to the engine's own OpenAI server."""

    path = "direct"

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    async def open(
        self, request: EngineRequest, call: ForwardedCall, replica: ReplicaState | None, ranking: list[str]
    ) -> EngineReply:
        if replica is None or replica.info.endpoint_url is None:
            raise NoReplicaAvailable("no engine server to send the request to")
        return await open_on_server(self._pool, replica.info.endpoint_url, call, replica.replica_id)


def reachable_from(replica: ReplicaState, node_id: str | None) -> bool:
    """Whether this node can reach the replica's server: a loopback address only from its own node."""
    url = replica.info.endpoint_url
    if url is None:
        return False
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return node_id is not None and replica.info.node_id == node_id
    return True


TransportFor = Callable[[ReplicaState], "Transport | None"]
"""The transport that reaches a replica from here, or None if none does."""


def without_prefill_handoff(call: ForwardedCall) -> ForwardedCall:
    """A retry recomputes the prompt rather than pull a KV cache the failed attempt may have consumed."""
    params = call.body.get("kv_transfer_params")
    if isinstance(params, dict) and params.get("do_remote_prefill"):
        return call.with_body(kv_transfer_params=None)
    return call


class RoutedClient:
    """Ranks one model's replicas of some roles and serves each request from the best that takes it."""

    def __init__(
        self,
        *,
        model: str,
        block_size: int,
        scheduler: Scheduler,
        transport_for: TransportFor,
        fallback: Transport | None = None,
        roles: tuple[ReplicaRole, ...] = ("mixed",),
        max_attempts: int = 3,
        avoid_failed_for_s: float = 3.0,
        metrics: RouterMetrics | None = None,
        streams: Counter | None = None,
        speculate: Callable[[str, list[int]], None] | None = None,
        on_request: Callable[[], None] = lambda: None,
        max_ongoing: Mapping[str, int | None] | None = None,
        max_queued: int | None = None,
        queue_recheck_s: float = 0.25,
        adapter_wait_s: float = 30.0,
    ) -> None:
        """`max_ongoing`: by role, the most of this router's requests one replica carries (None: no limit).
        `max_queued`: requests that may wait for a slot when every replica is full (None: no limit)."""
        self.roles = roles
        self._max_ongoing = dict(max_ongoing or {})
        self._max_queued = max_queued
        self._queue_recheck_s = queue_recheck_s
        self._adapter_wait_s = adapter_wait_s
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._model = model
        self._block_size = block_size
        self._scheduler = scheduler
        self._transport_for = transport_for
        self._fallback = fallback
        self._max_attempts = max_attempts
        self._avoid_failed_for_s = avoid_failed_for_s
        self._metrics = metrics
        self._streams = streams
        self._speculate = speculate
        self._on_request = on_request
        self._failed_until: dict[str, float] = {}

    async def _wait_for_adapter(self, routing: RoutingRequest, decision: Decision | None) -> Decision:
        """No engine is known to serve the request's adapter yet (just added: the engines are loading it;
        or the fleet is not known yet). Wait for one, re-ranking, up to `adapter_wait_s`; then 503."""
        deadline = time.monotonic() + self._adapter_wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if not self._scheduler.adapter_served(routing):
                continue  # ranking only once one serves it: each ranking counts towards the adapter's popularity
            decision = self._scheduler.schedule(routing, time.monotonic()) or decision
            if decision is not None and decision.ranked:
                return decision
        raise NoReplicaAvailable(f"No engine of model {self._model!r} serves adapter {routing.adapter!r} yet (it "
                                 f"was added {self._adapter_wait_s:.0f}s ago or more and has not loaded; see "
                                 "the engine replicas' logs). Retry after the indicated delay.")

    def role_of(self, replica_id: str) -> ReplicaRole | None:
        replica = self._scheduler.state.replicas.get(replica_id)
        return replica.info.role if replica is not None else None

    def route(self, request: EngineRequest) -> tuple[RoutingRequest, Decision | None]:
        """The scheduler's ranking for a request (None while no replica has registered)."""
        self._on_request()
        routing = RoutingRequest(
            model=self._model,
            block_hashes=request.block_hashes,
            num_prompt_tokens=request.num_prompt_tokens,
            block_size=self._block_size,
            roles=self.roles,
            adapter=request.lora_name,
        )
        started = time.perf_counter()
        decision = self._scheduler.schedule(routing, time.monotonic())
        if self._metrics is not None:
            m = self._metrics
            m.decision_seconds.labels(self._model).observe(time.perf_counter() - started)
            if decision is None:
                m.decisions.labels(self._model, self._scheduler.config.policy, "no_state").inc()
            else:
                m.decisions.labels(self._model, decision.policy, decision.reason).inc()
                m.routed_prompt_tokens.labels(self._model).inc(routing.num_prompt_tokens)
                m.estimated_hit_tokens.labels(self._model).inc(decision.matched_tokens)
                if decision.predicted_ttft_s is not None:
                    m.predicted_ttft.labels(self._model).observe(decision.predicted_ttft_s)
        return routing, decision

    async def open(self, request: EngineRequest, call: ForwardedCall) -> EngineReply:
        routing, decision = self.route(request)
        return await self.serve(request, call, routing, decision)

    async def serve(
        self, request: EngineRequest, call: ForwardedCall, routing: RoutingRequest, decision: Decision | None,
        *, learn: bool = True,
    ) -> EngineReply:
        """Send a ranked request down its ranking until a replica accepts it.

        `learn=False` when the TTFT is not the cost model's to explain (a decode that pulled its KV cache).
        """
        if decision is None and routing.adapter is not None:
            # Before the fleet is known (startup): the deployment's own choice may not serve the adapter.
            decision = await self._wait_for_adapter(routing, decision)
        if decision is None:
            # No replica registered yet (startup, or the state actor lost): the deployment's own choice.
            if self._fallback is None:
                raise NoReplicaAvailable(f"No server for model {self._model!r} is answering right now; the "
                                         "gateway keeps checking them. Retry after the indicated delay.")
            self._count(self._fallback.path)
            return await self._fallback.open(request, call, None, [])
        if not decision.ranked:
            decision = await self._wait_for_adapter(routing, decision)
        order = self._order(decision.ranked)
        if self._max_ongoing:
            while not (order := [rid for rid in order if not self._full(rid)]):
                await self._wait_for_slot()
                decision = self._scheduler.schedule(routing, time.monotonic()) or decision
                if not decision.ranked:  # the adapter was removed while this request queued here
                    decision = await self._wait_for_adapter(routing, decision)
                order = self._order(decision.ranked)
        last_error: EngineUnavailableError | None = None
        attempts = 0
        position = 0
        while position < len(order) and attempts < self._max_attempts:
            replica_id = order[position]
            position += 1
            replica = self._scheduler.state.replicas.get(replica_id)
            transport = (self._transport_for(replica) or self._fallback) if replica is not None else None
            if replica is None or transport is None:
                continue
            attempts += 1
            self._count(transport.path)
            dispatched = time.monotonic()
            self._dispatched(decision, routing, replica_id, dispatched)
            try:
                reply = await transport.open(request, call, replica, order[position - 1:])
            except EngineUnavailableError as error:
                self._scheduler.on_finish(decision, routing, replica_id, got_first_token=False)
                self._slot_freed()
                self._count("direct_failed")
                last_error = error
                retry = without_prefill_handoff(call)
                if retry is not call:
                    # It may be the hand-off that failed (the prefill engine died with the KV cache it
                    # held), not this replica: it computes the prompt itself before anyone else is tried.
                    call = retry
                    position -= 1
                    logger.warning("replica %s failed %s with a KV hand-off (%s); retrying it without",
                                   replica_id, request.request_id, error)
                    continue
                self._failed_until[replica_id] = time.monotonic() + self._avoid_failed_for_s
                logger.warning("replica %s failed before answering %s (%s); trying the next one",
                               replica_id, request.request_id, error)
                continue
            except BaseException:
                self._scheduler.on_finish(decision, routing, replica_id, got_first_token=False)
                self._slot_freed()
                raise
            self._accepted(decision, routing, replica_id, reply, dispatched, learn)
            return reply
        if last_error is None:
            raise NoReplicaAvailable(f"No server for model {self._model!r} is answering right now; the gateway "
                                     "keeps checking them. Retry after the indicated delay.")
        if isinstance(last_error, EngineOverloaded):
            raise EngineOverloaded(f"Every engine of model {self._model!r} that was tried is at its limit "
                                   f"({attempts} tried); retry after the indicated delay.")
        raise EngineFailed(f"No engine of model {self._model!r} could take the request ({attempts} tried); "
                           "retry after the indicated delay.")

    # -- capacity ------------------------------------------------------------------------------

    def _full(self, replica_id: str) -> bool:
        replica = self._scheduler.state.replicas.get(replica_id)
        if replica is None:
            return False
        limit = self._max_ongoing.get(replica.info.role)
        return limit is not None and replica.inflight >= limit

    @property
    def queued(self) -> int:
        """Requests waiting here for a replica with room."""
        return len(self._waiting)

    async def _wait_for_slot(self) -> None:
        if self._max_queued is not None and len(self._waiting) >= self._max_queued:
            if self._metrics is not None:
                self._metrics.shed.labels(self._model, "queue_full").inc()
            raise EngineOverloaded(f"Every engine of model {self._model!r} is at its limit and the gateway's queue "
                                   "for it is full; retry after the indicated delay.")
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        queued = self._metrics.queued.labels(self._model) if self._metrics is not None else None
        if queued is not None:
            queued.inc()
        try:
            # Woken when one of this router's requests finishes; rechecked now and then, since replicas
            # also join, and other routers' requests end.
            await asyncio.wait_for(asyncio.shield(waiter), self._queue_recheck_s)
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            if queued is not None:
                queued.dec()

    def _slot_freed(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- bookkeeping ---------------------------------------------------------------------------

    def _order(self, ranked: list[str]) -> list[str]:
        """The ranking, with replicas that just failed moved to the back (kept, in case all did)."""
        if not self._failed_until:
            return ranked
        now = time.monotonic()
        self._failed_until = {rid: until for rid, until in self._failed_until.items() if until > now}
        return [rid for rid in ranked if rid not in self._failed_until] + [
            rid for rid in ranked if rid in self._failed_until
        ]

    def _count(self, path: str) -> None:
        if self._streams is not None:
            self._streams.labels(self._model, path).inc()

    def _dispatched(self, decision: Decision, routing: RoutingRequest, replica_id: str, now: float) -> None:
        self._scheduler.on_dispatch(decision, routing, replica_id, now)
        if self._speculate is not None and routing.block_hashes:
            self._speculate(replica_id, list(routing.block_hashes))

    def _accepted(
        self, decision: Decision, routing: RoutingRequest, replica_id: str, reply: EngineReply, dispatched: float,
        learn: bool,
    ) -> None:
        ttft = time.monotonic() - dispatched
        actual = reply.replica_id or replica_id
        if actual != replica_id:
            # Serve sent it to another replica (the first choice was full): move the bookkeeping.
            self._scheduler.on_finish(decision, routing, replica_id, got_first_token=False)
            self._dispatched(decision, routing, actual, dispatched)
        # A whole (non-streamed) answer has no first-token time to learn from.
        learn = learn and reply.stream
        self._scheduler.on_first_token(decision, routing, actual, ttft, learn=learn)
        m = self._metrics
        if m is not None and reply.stream:
            m.observed_ttft.labels(self._model).observe(ttft)
            if learn and decision.predicted_ttft_s is not None and actual == decision.replica_id:
                m.ttft_error.labels(self._model).observe(abs(ttft - decision.predicted_ttft_s))

        def finished(reply: EngineReply) -> None:
            self._scheduler.on_finish(decision, routing, actual, got_first_token=True)
            self._slot_freed()
            if m is not None:
                m.engine_hit_tokens.labels(self._model).inc(_cached_tokens(reply.usage))

        reply.on_close(finished)


def _cached_tokens(usage: dict[str, Any] | None) -> int:
    details = (usage or {}).get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)
