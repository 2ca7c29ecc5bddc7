"""Live state of one external OpenAI-compatible server: load from its /metrics, health, restarts.

The gateway does not own these servers, so it cannot know when one restarts. It infers it:
- a counter that only grows (prompt tokens, prefix-cache queries, finished requests) went down;
- or the server stopped answering for `down_after_s` and came back.

A gap counts only when the server was asked and did not answer: a watcher that was itself late (a
stalled event loop, a slow call elsewhere) must not mistake its own silence for the server's, or
every pause would drop the router's picture of a healthy server's cache.

Either way the server's prefix cache is empty now, so the router must drop what it believed the
server held. `generation` goes up by one each time; whoever mirrors the server's cache compares it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

from app.engines.external.dialects import Dialect, blank_stats, dialect_of, read_stats
from app.engines.vllm.metrics import MetricsFormatError
from app.protocol.engine import CacheConfig, EngineStats
from app.upstream import UpstreamError, UpstreamPool


class ScrapeError(Exception):
    """The server answered /metrics with an error status."""

_MONOTONIC_COUNTERS = ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "request_success")


def counters_went_back(before: EngineStats, after: EngineStats) -> bool:
    """True if any counter that only grows on a running server is lower now: the server restarted."""
    return any(getattr(after, name) < getattr(before, name) for name in _MONOTONIC_COUNTERS)


@dataclass
class PollResult:
    ok: bool
    restarted: bool = False
    error: str | None = None


class EndpointMonitor:
    """Polls one server's /metrics. Call `poll()` on an interval; read `healthy`, `stats`, `generation`."""

    def __init__(
        self,
        url: str,
        http: UpstreamPool,
        *,
        model: str,
        endpoint_id: str,
        declared: CacheConfig,
        metrics: Literal["auto", "vllm", "sglang", "none"] = "auto",
        health_path: str = "/health",
        down_after_s: float = 3.0,
        timeout_s: float = 2.0,
    ) -> None:
        """`declared`: the cache geometry the config gives, for servers whose metrics do not say it."""
        self.url = url.rstrip("/")
        self.endpoint_id = endpoint_id
        self._http = http
        self._model = model
        self._declared = declared
        self._metrics = metrics
        self._health_path = health_path
        self.dialect: Dialect | None = None
        """What the server's metrics speak, once it has answered."""
        self._down_after_s = down_after_s
        self._timeout_s = timeout_s
        self.stats: EngineStats | None = None
        self.generation = 0
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self._failing = False
        """The latest poll got no good answer."""
        self._was_down = False

    @property
    def healthy(self) -> bool:
        if self.last_ok is None:
            return False
        return not (self._failing and time.monotonic() - self.last_ok > self._down_after_s)

    async def _get(self, path: str) -> str:
        async with asyncio.timeout(self._timeout_s):
            response = await self._http.request(self.url, path, method="GET")
            body = await response.read()
        if response.status != 200:
            raise ScrapeError(f"HTTP {response.status} from {self.url}{path}")
        return body.decode(errors="replace")

    async def _read(self) -> tuple[EngineStats, Dialect]:
        """The server's stats in the dialect its page speaks; for a server without readable metrics (in
        auto, or `none`), blank stats while its health route answers."""
        ids = {"engine_id": self.endpoint_id, "model": self._model, "declared": self._declared}
        if self._metrics != "none":
            try:
                text: str | None = await self._get("/metrics")
            except ScrapeError:
                if self._metrics != "auto":
                    raise
                text = None
            dialect = (dialect_of(text) if text is not None else None) if self._metrics == "auto" else self._metrics
            if dialect is not None and text is not None:
                return read_stats(dialect, text, **ids), dialect
        await self._get(self._health_path)
        return blank_stats(**ids), "none"

    async def poll(self) -> PollResult:
        try:
            stats, self.dialect = await self._read()
        except (UpstreamError, ScrapeError, TimeoutError, MetricsFormatError) as error:
            self.last_error = f"{type(error).__name__}: {error}"
            self._failing = True
            if not self.healthy and self.last_ok is not None:
                self._was_down = True
            return PollResult(ok=False, error=self.last_error)
        restarted = self.stats is not None and (self._was_down or counters_went_back(self.stats, stats))
        if restarted:
            self.generation += 1
        self._was_down = False
        self._failing = False
        self.stats = stats
        self.last_ok = time.monotonic()
        self.last_error = None
        return PollResult(ok=True, restarted=restarted)
