"""The simulated engine behind the engine protocol, driven in (scaled) real time.

A background task runs core steps and sleeps each step's modelled duration times `time_scale`.
This layer turns token ids into text, applies stop strings, and coalesces outputs a slow reader
has not collected yet, so a stream never carries more messages than its reader can take.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.core import CoreOutput, SimulatedEngineCore
from app.engines.simulated.metrics import EngineMetrics
from app.kv.events import encode_batch
from app.protocol.engine import (
    CacheConfig,
    EngineOutput,
    EngineRequest,
    EngineRole,
    EngineStats,
    TokenLogprob,
    TopLogprob,
    merge_outputs,
)
from app.tokenizer import IncrementalDetokenizer, PromptTokenizer

if TYPE_CHECKING:
    from app.http_listener import HTTPListener

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Stream:
    """One request's output channel and text state."""

    request: EngineRequest
    detokenizer: IncrementalDetokenizer
    arrival: float
    queue: asyncio.Queue[EngineOutput] = field(default_factory=asyncio.Queue)
    held_text: str = ""
    last_token_time: float | None = None
    finished: bool = False
    logprob_rng: random.Random = field(default_factory=random.Random)


class SimulatedEngine:
    """Implements app.protocol.engine.Engine over SimulatedEngineCore."""

    def __init__(
        self,
        config: SimulatedEngineConfig,
        tokenizer: PromptTokenizer,
        *,
        model: str,
        max_model_len: int,
        engine_id: str | None = None,
        role: EngineRole = "mixed",
        host_ip: str = "127.0.0.1",
        adapters: Mapping[str, str] | None = None,
    ) -> None:
        """`role` and `host_ip` are every kind's constructor arguments; the simulator plays any role alike
        and listens where its replica says. `adapters`: LoRA adapters its server serves (name -> path)."""
        self.adapters = dict(adapters or {})
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self._http: HTTPListener | None = None
        special = tokenizer.special_token_ids
        # Generate only tokens that decode to whole characters, so answers are readable text.
        vocab = [
            i for i in range(tokenizer.vocab_size)
            if i not in special and "\ufffd" not in tokenizer.decode([i])
        ]
        self.core = SimulatedEngineCore(
            config,
            vocab_token_ids=vocab,
            eos_token_id=tokenizer.eos_token_id,
            max_model_len=max_model_len,
            engine_id=engine_id,
        )
        self.engine_id = self.core.engine_id
        self.metrics = EngineMetrics(model=model, engine=self.engine_id, stats=self.stats)
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._clock_origin = time.monotonic()
        self._closed = False
        # Bounded like vLLM's publisher buffer: if nobody drains, the oldest batches are dropped
        # (a router resynchronizes from cached_block_hashes()).
        self._kv_batches: deque[bytes] = deque(maxlen=10_000)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name=f"sim-engine-{self.engine_id}")

    async def serve_http(self, node_ip: str) -> str | None:
        """Serve this engine's OpenAI API at `config.server_host`, as a vLLM replica's server does, so
        ingresses relay answers straight from it; its URL (None: `server_host: null`, no server)."""
        host = self.config.server_host
        if host is None:
            return None
        from app.engines.simulated.server import create_app  # FastAPI: only engines that serve need it
        from app.http_listener import HTTPListener

        app = create_app(self.config, model=self.model, max_model_len=self.core.max_model_len, engine=self)
        self._http = HTTPListener(app, host, 0, name="engine server")
        await self._http.start()
        public = node_ip if host in ("0.0.0.0", "::") else host
        return f"http://[{public}]:{self._http.port}" if ":" in public else f"http://{public}:{self._http.port}"

    async def shutdown(self) -> None:
        self._closed = True
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        for request_id in list(self._streams):
            await self.abort(request_id)

    @property
    def healthy(self) -> bool:
        # Not started yet is healthy: the loop starts with the first request.
        loop_died = self._loop_task is not None and self._loop_task.done()
        return not (loop_died or self._closed)

    # -- protocol ------------------------------------------------------------------------------

    @property
    def cache_config(self) -> CacheConfig:
        return self.core.cache_config

    def stats(self) -> EngineStats:
        return EngineStats(
            engine_id=self.engine_id,
            model=self.model,
            num_requests_running=self.core.num_running,
            num_requests_waiting=self.core.num_waiting,
            kv_cache_usage_perc=self.core.cache.usage,
            adapters=self.core.adapters,
            **self.core.counters.model_dump(),
            cache_config=self.core.cache_config,
            timestamp=time.time(),
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if self._loop_task is None:
            await self.start()
        stream = _Stream(request, IncrementalDetokenizer(self.tokenizer), arrival=self._now(),
                         logprob_rng=random.Random(request.request_id))
        self.core.add_request(request, self._now())  # raises EngineRequestRejected up front
        self._streams[request.request_id] = stream
        self._wake.set()
        try:
            while True:
                pending = [await stream.queue.get()]
                while not stream.queue.empty():
                    pending.append(stream.queue.get_nowait())
                output = merge_outputs(pending)
                yield output
                if output.finished:
                    return
        finally:
            if not stream.finished:
                await self.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        self.core.abort(request_id)
        if stream is not None and not stream.finished:
            stream.finished = True
            self.metrics.observe_finish(stream.arrival, self._now())
            stream.queue.put_nowait(EngineOutput(request_id=request_id, finish_reason="abort"))

    def take_kv_events(self) -> list[bytes]:
        batches = list(self._kv_batches)
        self._kv_batches.clear()
        return batches

    def cached_block_hashes(self) -> list[int] | None:
        return list(self.core.cache.cached_hashes())

    def _publish_kv_events(self) -> None:
        events = self.core.take_kv_events()
        if events:
            self._kv_batches.append(encode_batch(time.time(), events))

    # -- the step loop -------------------------------------------------------------------------

    def _now(self) -> float:
        """Modelled seconds since the engine was made."""
        return (time.monotonic() - self._clock_origin) / self.config.time_scale

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.core.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = loop.time()
            try:
                result = self.core.step(self._now())
            except Exception:  # a bug here must not hang every stream: fail them loudly
                logger.exception("simulated engine step failed")
                for request_id in list(self._streams):
                    await self.abort(request_id)
                continue
            # Sleep to the step's end even if computing it took a while, so model time keeps pace.
            delay = started + result.duration * self.config.time_scale - loop.time()
            await asyncio.sleep(max(delay, 0.0))
            now = self._now()
            self._publish_kv_events()
            for output in result.outputs:
                self._deliver(output, now)

    def _deliver(self, core_output: CoreOutput, now: float) -> None:
        stream = self._streams.get(core_output.request_id)
        if stream is None or stream.finished:
            return
        sampling = stream.request.sampling
        text = stream.held_text + stream.detokenizer.add(core_output.new_token_ids)
        finish_reason, stop_reason = core_output.finish_reason, core_output.stop_reason
        held = ""
        if sampling.stop:
            hit = _find_stop(text, sampling.stop)
            if hit is not None:
                text, stop_reason, finish_reason = text[: hit[0]], hit[1], "stop"
            elif finish_reason is None:
                # Hold back a tail that could be the start of a stop string.
                keep = max(len(s) for s in sampling.stop) - 1
                text, held = (text[:-keep], text[-keep:]) if keep and len(text) > keep else ("", text)
        stream.held_text = held
        self.metrics.observe_token(stream.arrival, stream.last_token_time, now, len(core_output.new_token_ids))
        stream.last_token_time = now
        output = EngineOutput(
            request_id=core_output.request_id,
            token_ids=core_output.new_token_ids,
            text=text,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            num_prompt_tokens=core_output.num_prompt_tokens,
            num_cached_tokens=core_output.num_cached_tokens,
            kv_transfer_params=core_output.kv_transfer_params,
            logprobs=self._logprobs(stream, core_output.new_token_ids) if sampling.logprobs is not None else None,
        )
        if finish_reason is not None:
            stream.finished = True
            self._streams.pop(core_output.request_id, None)
            self.core.abort(core_output.request_id)  # a stop string ends it early; no-op otherwise
            self.metrics.observe_finish(stream.arrival, now)
        stream.queue.put_nowait(output)

    def _logprobs(self, stream: _Stream, token_ids: list[int]) -> list[TokenLogprob]:
        """Made-up log-probabilities in vLLM's shape: each token was the likeliest, its alternatives less so."""
        rng, top = stream.logprob_rng, stream.request.sampling.logprobs or 0
        decode = self.tokenizer.decode
        entries = []
        for token_id in token_ids:
            logprob = math.log(rng.uniform(0.3, 1.0))
            alternatives = [TopLogprob(token=decode([token_id], skip_special_tokens=False), logprob=logprob,
                                       token_id=token_id)]
            for rank in range(1, top):
                other = rng.randrange(self.tokenizer.vocab_size)
                alternatives.append(TopLogprob(token=decode([other], skip_special_tokens=False),
                                               logprob=logprob - rank - rng.random(), token_id=other))
            entries.append(TokenLogprob(token=alternatives[0].token, logprob=logprob, token_id=token_id,
                                        top_logprobs=alternatives[:top]))
        return entries


def _find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    found = [(index, stop) for stop in stops if stop and (index := text.find(stop)) >= 0]
    return min(found) if found else None
