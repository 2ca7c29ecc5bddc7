"""A real vLLM engine behind the engine protocol: a managed `vllm serve` child per replica.

Why a child server and not vLLM's AsyncLLM in the replica's process: the OpenAI server is vLLM's
most stable interface (AsyncLLM's signatures change between releases), it gives vLLM's own
detokenization, stop handling, logprobs and KV-transfer hand-off, and clients talk to it as to any
vLLM server. The gateway sends requests straight to that server and relays its answers
(app/gateway/relay.py); `generate` here is the engine protocol's in-process way in, for tests and
tools, and merges outputs a slow reader has not collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping

import httpx

from app.engines.vllm.client import VLLMCompletionsClient, token_text
from app.engines.vllm.config import VLLMEngineConfig
from app.engines.vllm.kv_events import KVEventSubscriber
from app.engines.vllm.metrics import MetricsFormatError, engine_stats
from app.engines.vllm.process import EngineRole, VLLMServerProcess, free_port, server_argv, server_env
from app.protocol.engine import (
    CacheConfig,
    EngineOutput,
    EngineRequest,
    EngineStats,
    EngineUnavailableError,
    merge_outputs,
)
from app.tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)

_END = object()
_ANY_ADDRESS = ("0.0.0.0", "::")


def _http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class VLLMServerEngine:
    """Implements app.protocol.engine.Engine over a vLLM OpenAI server it starts and stops."""

    def __init__(
        self,
        config: VLLMEngineConfig,
        tokenizer: PromptTokenizer | None = None,
        *,
        model: str,
        max_model_len: int,
        engine_id: str | None = None,
        role: EngineRole = "mixed",
        host_ip: str = "127.0.0.1",
        adapters: Mapping[str, str] | None = None,
    ) -> None:
        """`adapters`: LoRA adapters vLLM serves under their own names (name -> folder), loaded into its
        `max_loras` slots on demand."""
        self.config = config
        self.adapters = dict(adapters or {})
        self.model = model
        self.role = role
        self.engine_id = engine_id or f"vllm-{uuid.uuid4().hex[:8]}"
        self._max_model_len = max_model_len
        self._tokenizer = tokenizer
        self._node_ip = host_ip
        self._host_ip = config.kv_transfer.side_channel_host or host_ip
        self._endpoint_url: str | None = None
        self._process: VLLMServerProcess | None = None
        self._http: httpx.AsyncClient | None = None
        self._completions: VLLMCompletionsClient | None = None
        self._events: KVEventSubscriber | None = None
        self._stats: EngineStats | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self.startup_seconds: float | None = None
        self._unanswered_since: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the server and wait until it serves (idempotent)."""
        async with self._start_lock:
            if self._started:
                return
            host = self.config.server_host
            port = free_port("0.0.0.0" if host == "::" else host)
            # The replica itself talks to the server over loopback when it listens everywhere.
            base_url = _http_url("127.0.0.1" if host in _ANY_ADDRESS else host, port)
            self._endpoint_url = _http_url(self._node_ip if host in _ANY_ADDRESS else host, port)
            self._events = KVEventSubscriber() if self.config.enable_prefix_caching else None
            argv = server_argv(
                self.config, served_model_name=self.model, max_model_len=self._max_model_len, port=port,
                role=self.role, kv_events_endpoint=self._events.endpoint if self._events else None,
                adapters=self.adapters,
            )
            env = server_env(self.config, self.role, side_channel_host=self._host_ip,
                             side_channel_port=free_port(self._host_ip),
                             lora=bool(self.adapters) or self.config.enable_lora)
            # Streams can idle for long between tokens under load; only connecting is bounded.
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=64))
            self._completions = VLLMCompletionsClient(self._http, base_url, self.model, decode=self._decode_token)
            self._process = VLLMServerProcess(argv, env, base_url, name=f"vllm-{self.role}-{self.engine_id[:8]}")
            if self._events is not None:
                self._events.start()
            self._process.start()
            try:
                self.startup_seconds = await self._process.wait_healthy(self._http, self.config.startup_timeout_s)
                await self._refresh_stats()
            except BaseException:
                await self.shutdown()
                raise
            logger.info("vLLM engine %s (%s) ready in %.1fs", self.engine_id, self.role, self.startup_seconds)
            self._stats_task = asyncio.get_running_loop().create_task(self._stats_loop())
            self._started = True

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._streams.values()):
            task.cancel()
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self._process is not None:
            await self._process.stop()
        if self._events is not None:
            await self._events.close()
        if self._http is not None:
            await self._http.aclose()

    @property
    def healthy(self) -> bool:
        """The server runs and has answered /metrics within `unresponsive_after_s` (a hung server is not healthy)."""
        if not (self._started and not self._closed and self._process is not None and self._process.running):
            return False
        silent_since = self._unanswered_since
        return silent_since is None or time.monotonic() - silent_since < self.config.unresponsive_after_s

    @property
    def base_url(self) -> str:
        assert self._process is not None, "start() the engine first"
        return self._process.base_url

    @property
    def endpoint_url(self) -> str:
        """The server as other nodes reach it (the ingress streams from it directly)."""
        assert self._endpoint_url is not None, "start() the engine first"
        return self._endpoint_url

    def _decode_token(self, token_id: int) -> str:
        return token_text(self._tokenizer, token_id)

    # -- stats ---------------------------------------------------------------------------------

    async def _refresh_stats(self) -> None:
        assert self._http is not None and self._process is not None
        response = await self._http.get(f"{self._process.base_url}/metrics", timeout=5.0)
        response.raise_for_status()
        self._stats = engine_stats(
            response.text, engine_id=self.engine_id, model=self.model, hash_seed=self.config.hash_seed
        )

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            try:
                await self._refresh_stats()
                self._unanswered_since = None
            except (httpx.HTTPError, MetricsFormatError) as error:
                if self._unanswered_since is None:
                    self._unanswered_since = time.monotonic()
                    logger.warning("engine %s: reading /metrics failed: %s", self.engine_id, error)

    def stats(self) -> EngineStats:
        if self._stats is None:
            raise RuntimeError("the engine has not started")
        return self._stats

    @property
    def cache_config(self) -> CacheConfig:
        return self.stats().cache_config

    # -- KV events -----------------------------------------------------------------------------

    def take_kv_events(self) -> list[bytes]:
        return self._events.take_kv_events() if self._events else []

    def cached_block_hashes(self) -> list[int] | None:
        return self._events.cached_block_hashes() if self._events else []

    # -- requests ------------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if not self.healthy or self._completions is None:
            raise EngineUnavailableError(f"the vLLM engine {self.engine_id} is not running")
        params = request.kv_transfer_params or {}
        if params.get("do_remote_decode") or self.role == "prefill":
            # A prefill hand-off: vLLM returns kv_transfer_params only on a non-streamed answer.
            output = await self._completions.complete(request)
            yield output
            return
        queue: asyncio.Queue[object] = asyncio.Queue()
        reader = asyncio.get_running_loop().create_task(self._read(request, queue))
        self._streams[request.request_id] = reader
        try:
            while True:
                item = await queue.get()
                batch = [item]
                while not queue.empty():  # whatever else arrived meanwhile goes out as one message
                    batch.append(queue.get_nowait())
                outputs = [x for x in batch if isinstance(x, EngineOutput)]
                if outputs:
                    yield merge_outputs(outputs)
                if isinstance(batch[-1], BaseException):
                    raise batch[-1]
                if batch[-1] is _END:
                    return
        finally:
            # Closing early (the client left) cancels the HTTP stream, and vLLM aborts the request.
            self._streams.pop(request.request_id, None)
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _read(self, request: EngineRequest, queue: asyncio.Queue[object]) -> None:
        assert self._completions is not None
        try:
            async with contextlib.aclosing(self._completions.stream(request)) as outputs:
                async for output in outputs:
                    queue.put_nowait(output)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            queue.put_nowait(error)

    async def abort(self, request_id: str) -> None:
        task = self._streams.get(request_id)
        if task is not None:
            task.cancel()
