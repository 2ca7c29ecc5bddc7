"""The simulated engine's scheduler and model, as a pure step function over a given clock.

Like vLLM v1: continuous batching of up to max_num_seqs sequences, a token budget per step with
chunked prefill, running sequences first, then waiting ones while KV blocks last; a running
sequence that cannot grow preempts the newest one, which is recomputed later. Prefix-cache hits
skip prefill work. Nothing here sleeps: callers own time (real time, or a discrete-event clock).
"""

from __future__ import annotations

import random
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import xxhash

from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.kv_cache import KVBlock, KVCache
from app.engines.simulated.timing import StepWork, step_duration
from app.kv.events import KVEvent
from app.kv.hashing import BlockHash, external_hash, get_hasher
from app.protocol.engine import (
    AdapterLoad,
    CacheConfig,
    EngineCounters,
    EngineRequest,
    EngineRequestRejected,
    FinishReason,
)


@dataclass(slots=True)
class CoreOutput:
    """New tokens of one request after a step (or its end)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None


@dataclass(slots=True)
class StepResult:
    duration: float
    outputs: list[CoreOutput]
    work: StepWork


@dataclass(slots=True, eq=False)
class _Sequence:
    request: EngineRequest
    arrival: float
    rng: random.Random
    token_ids: list[int]
    num_prompt_tokens: int
    block_digests: list[bytes]
    """vLLM's full block digests: the chain continues from the last one as output fills blocks."""
    block_hashes: list[BlockHash]
    blocks: list[KVBlock] = field(default_factory=list)
    num_computed: int = 0
    num_committed_blocks: int = 0
    num_cached_tokens: int = 0
    num_external_tokens: int = 0
    first_scheduled: float | None = None
    first_token_time: float | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class SimulatedEngineCore:
    """Deterministic engine state machine: add requests, then call step(now) repeatedly."""

    def __init__(
        self,
        config: SimulatedEngineConfig,
        *,
        vocab_token_ids: list[int],
        eos_token_id: int | None,
        max_model_len: int,
        engine_id: str | None = None,
    ) -> None:
        if not vocab_token_ids:
            raise ValueError("the simulated model needs at least one ordinary token to generate")
        self.config = config
        self.engine_id = engine_id or uuid.uuid4().hex[:12]
        self.max_model_len = max_model_len
        self._vocab = vocab_token_ids
        self._eos = eos_token_id
        self._eos_probability = 1.0 / config.mean_output_tokens
        self._rng = random.Random(config.seed)
        self.cache = KVCache(
            config.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.counters = EngineCounters()
        self._hasher = get_hasher(config.hash_algo, config.hash_seed)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}
        self._adapters: OrderedDict[str, None] = OrderedDict()
        """Adapters in the slots, least recently used first."""
        self.adapter_loads = 0
        self.adapter_evictions = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.config.block_size,
            num_gpu_blocks=self.config.num_blocks,
            prefix_caching_hash_algo=self.config.hash_algo,
            hash_seed=self.config.hash_seed,
            enable_prefix_caching=self.config.enable_prefix_caching,
        )

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def adapters(self) -> AdapterLoad:
        return AdapterLoad(
            max_loras=self.config.max_loras,
            running=sorted({name for seq in self._running if (name := seq.request.lora_name)}),
            waiting=sorted({name for seq in self._waiting if (name := seq.request.lora_name)}),
            loaded=list(self._adapters), loads=self.adapter_loads, evictions=self.adapter_evictions,
        )

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest, now: float) -> None:
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already running")
        prompt = request.prompt_token_ids
        if not prompt:
            raise EngineRequestRejected("the prompt is empty")
        max_tokens = request.sampling.max_tokens
        if len(prompt) >= self.max_model_len:
            raise EngineRequestRejected(
                f"the prompt ({len(prompt)} tokens) leaves no room in the model's context of "
                f"{self.max_model_len} tokens"
            )
        total = self.max_model_len if max_tokens is None else len(prompt) + max_tokens
        if total > self.max_model_len:
            raise EngineRequestRejected(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) "
                f"exceeds the model's context of {self.max_model_len} tokens"
            )
        if self.cache.blocks_for(total) > self.cache.num_blocks:
            raise EngineRequestRejected(
                f"the request needs {self.cache.blocks_for(total)} KV blocks but the engine has "
                f"{self.cache.num_blocks}"
            )
        # Like vLLM, the engine hashes the prompt itself; the router's hashes are only its guess.
        digests = self._hasher.digests(
            prompt, self.config.block_size, lora_name=request.lora_name, cache_salt=request.cache_salt,
            lora_path=request.lora_path,
        )
        seq = _Sequence(
            request=request,
            arrival=now,
            rng=self._sampler_for(request),
            token_ids=list(prompt),
            num_prompt_tokens=len(prompt),
            block_digests=digests,
            block_hashes=[external_hash(d) for d in digests],
        )
        self._by_id[request.request_id] = seq
        self._enqueue(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; frees its blocks. Returns whether it was known."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return False
        if seq in self._running:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self.cache.release(seq.blocks)
        seq.blocks = []
        return True

    # -- the step ------------------------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """Schedule one batch, run it in model time, and return its duration and outputs."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[_Sequence, int]] = []
        prefill_tokens = decode_seqs = transferred = 0

        for seq in list(self._running):
            if budget <= 0:
                break
            if seq not in self._running:  # preempted by an earlier sequence in this loop
                continue
            num_new = min(len(seq.token_ids) - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + num_new):
                continue
            scheduled.append((seq, num_new))
            budget -= num_new
            if seq.num_computed < seq.num_prompt_tokens:
                prefill_tokens += num_new
            else:
                decode_seqs += 1

        # As vLLM's scheduler: the adapters of running requests hold their slots; a waiting request whose
        # adapter needs one more slot than there are is passed over (it keeps its place), others go on.
        active = {name for seq in self._running if (name := seq.request.lora_name)}
        passed_over: list[_Sequence] = []
        loads = 0
        while self._waiting and budget > 0 and len(self._running) < self.config.max_num_seqs:
            seq = self._waiting[0]
            adapter = seq.request.lora_name
            if adapter and adapter not in active and len(active) >= self.config.max_loras:
                passed_over.append(self._waiting.popleft())
                continue
            admitted = self._admit(seq, budget, now)
            if admitted is None:
                break  # head of line waits for KV space, as in vLLM
            num_new, num_transferred = admitted
            self._waiting.popleft()
            self._running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
            prefill_tokens += num_new
            transferred += num_transferred
            if adapter:
                loads += self._use_adapter(adapter, active)
                active.add(adapter)
        self._waiting.extendleft(reversed(passed_over))

        work = StepWork(prefill_tokens, decode_seqs, transferred)
        duration = step_duration(work, self.config.step_time) + loads * self.config.lora_load_s
        outputs = [out for seq, n in scheduled if (out := self._advance(seq, n, now + duration))]
        return StepResult(duration=duration, outputs=outputs, work=work)

    # -- internals -----------------------------------------------------------------------------

    def _use_adapter(self, adapter: str, active: set[str]) -> int:
        """Put an adapter in a slot if it is not in one (evicting the least recently used idle one when
        the slots are full); returns the loads this took (0 or 1)."""
        if adapter in self._adapters:
            self._adapters.move_to_end(adapter)
            return 0
        if len(self._adapters) >= self.config.max_loras:
            idle = next(name for name in self._adapters if name not in active)
            del self._adapters[idle]
            self.adapter_evictions += 1
        self._adapters[adapter] = None
        self.adapter_loads += 1
        return 1

    def _enqueue(self, seq: _Sequence, *, front: bool = False) -> None:
        if front:
            self._waiting.appendleft(seq)
        elif self.config.scheduling_policy == "priority":
            key = (seq.request.priority, seq.arrival)
            index = next(
                (i for i, other in enumerate(self._waiting) if (other.request.priority, other.arrival) > key),
                len(self._waiting),
            )
            self._waiting.insert(index, seq)
        else:
            self._waiting.append(seq)

    def _admit(self, seq: _Sequence, budget: int, now: float) -> tuple[int, int] | None:
        """Reserve KV blocks for a waiting sequence's first chunk; None if they do not fit."""
        block_size = self.config.block_size
        first_time = seq.first_scheduled is None
        # The last prompt token is always recomputed to produce logits, so at most
        # (len - 1) // block_size blocks can come from a cache.
        max_hit_blocks = (len(seq.token_ids) - 1) // block_size
        hits = self.cache.cached_prefix(seq.block_hashes[:max_hit_blocks])
        num_external_blocks = 0
        params = seq.request.kv_transfer_params or {}
        if params.get("do_remote_prefill") and first_time:
            num_external_blocks = max_hit_blocks - len(hits)
        num_computed = (len(hits) + num_external_blocks) * block_size
        num_new = min(len(seq.token_ids) - num_computed, budget)
        new_blocks = self.cache.blocks_for(num_computed + num_new) - len(hits)
        if not self.cache.can_allocate(new_blocks, hits):
            return None
        self.cache.acquire(hits)
        seq.blocks = hits + self.cache.allocate(new_blocks)
        seq.num_computed = num_computed
        seq.num_committed_blocks = len(hits)
        if first_time:
            seq.first_scheduled = now
            seq.num_cached_tokens = len(hits) * block_size
            seq.num_external_tokens = num_external_blocks * block_size
            counters = self.counters
            counters.prefix_cache_queries += seq.num_prompt_tokens
            counters.prefix_cache_hits += seq.num_cached_tokens
            counters.prompt_tokens += seq.num_prompt_tokens
            if params.get("do_remote_prefill"):
                counters.external_prefix_cache_queries += seq.num_prompt_tokens - seq.num_cached_tokens
                counters.external_prefix_cache_hits += seq.num_external_tokens
        return num_new, num_external_blocks

    def _grow(self, seq: _Sequence, num_tokens: int) -> bool:
        """Make room for `num_tokens` of KV; preempt the newest sequences if needed."""
        needed = self.cache.blocks_for(num_tokens) - len(seq.blocks)
        while needed > self.cache.num_free_blocks:
            victim = self._running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if needed > 0:
            seq.blocks.extend(self.cache.allocate(needed))
        return True

    def _preempt(self, seq: _Sequence) -> None:
        self._running.remove(seq)
        self.cache.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_committed_blocks = 0
        self.counters.num_preemptions += 1
        self._enqueue(seq, front=True)

    def _advance(self, seq: _Sequence, num_new: int, now: float) -> CoreOutput | None:
        seq.num_computed += num_new
        self._commit_full_blocks(seq)
        if seq.num_computed < len(seq.token_ids):
            return None  # a prefill chunk that does not reach the end of the prompt yet
        token = self._sample(seq)
        seq.token_ids.append(token)
        self.counters.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        finish, stop_reason = self._finish_reason(seq, token)
        output = CoreOutput(
            request_id=seq.request.request_id,
            new_token_ids=[token],
            finish_reason=finish,
            stop_reason=stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens + seq.num_external_tokens,
        )
        if finish is not None:
            output.kv_transfer_params = self._transfer_params(seq)
            self.counters.request_success += 1
            self._by_id.pop(seq.request.request_id, None)
            self._running.remove(seq)
            self.cache.release(seq.blocks)
            seq.blocks = []
        return output

    def _commit_full_blocks(self, seq: _Sequence) -> None:
        block_size = self.config.block_size
        num_full = min(seq.num_computed // block_size, len(seq.blocks))
        if num_full > len(seq.block_hashes):
            # Blocks filled by generated tokens extend the hash chain, as vLLM caches them too.
            start = len(seq.block_hashes) * block_size
            more = self._hasher.digests(
                seq.token_ids[start : num_full * block_size],
                block_size,
                lora_name=seq.request.lora_name,
                lora_path=seq.request.lora_path,
                cache_salt=seq.request.cache_salt,
                parent=seq.block_digests[-1] if seq.block_digests else None,
                first_block_index=len(seq.block_digests),
            )
            seq.block_digests.extend(more)
            seq.block_hashes.extend(external_hash(d) for d in more)
        for index in range(seq.num_committed_blocks, num_full):
            self.cache.commit(
                seq.blocks[index],
                seq.block_hashes[index],
                parent_hash=seq.block_hashes[index - 1] if index else None,
                token_ids=seq.token_ids[index * block_size : (index + 1) * block_size],
                lora_name=seq.request.lora_name,
            )
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def take_kv_events(self) -> list[KVEvent]:
        """KV events since the last call, in the order the cache changed."""
        return self.cache.take_events()

    def _sample(self, seq: _Sequence) -> int:
        sampling = seq.request.sampling
        if self._eos is not None and not sampling.ignore_eos and seq.rng.random() < self._eos_probability:
            return self._eos
        return seq.rng.choice(self._vocab)

    def _finish_reason(self, seq: _Sequence, token: int) -> tuple[FinishReason | None, int | None]:
        sampling = seq.request.sampling
        if token == self._eos and not sampling.ignore_eos:
            return "stop", None
        if token in sampling.stop_token_ids:
            return "stop", token
        if (sampling.max_tokens is not None and seq.num_output_tokens >= sampling.max_tokens) or len(
            seq.token_ids
        ) >= self.max_model_len:
            return "length", None
        return None, None

    def _transfer_params(self, seq: _Sequence) -> dict[str, Any] | None:
        params = seq.request.kv_transfer_params or {}
        if not params.get("do_remote_decode"):
            return None
        # What a NIXL prefill engine hands back: where a decode engine can pull this prompt's blocks.
        full = seq.num_prompt_tokens // self.config.block_size
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_block_ids": [[block.block_id for block in seq.blocks[:full]]],
            "remote_host": None,
            "remote_port": None,
            "remote_request_id": seq.request.request_id,
            "tp_size": 1,
        }

    def _sampler_for(self, request: EngineRequest) -> random.Random:
        sampling = request.sampling
        if sampling.seed is not None:
            return random.Random(_prompt_digest(request) ^ sampling.seed)
        if sampling.temperature == 0.0:
            # Greedy decoding: the same prompt gives the same answer on every engine.
            return random.Random(_prompt_digest(request))
        return random.Random(self._rng.getrandbits(64) ^ _prompt_digest(request))


def _prompt_digest(request: EngineRequest) -> int:
    return xxhash.xxh3_64_intdigest(repr((request.prompt_token_ids, request.lora_name)).encode())

