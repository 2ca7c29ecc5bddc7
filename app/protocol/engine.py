"""The one engine protocol every engine implements, simulated or real vLLM.

The ingress talks only to this: it sends prompt token ids (tokenized once, upstream) and gets a
stream of outputs back. Types here cross process boundaries, so they are plain pydantic models.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "abort"]
EngineRole = Literal["mixed", "prefill", "decode"]
"""What an engine replica does: whole requests, or one side of a prefill/decode split."""


class SamplingParams(BaseModel):
    """What to generate. Mirrors the subset of vLLM's SamplingParams the gateway forwards."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(
        default=None, ge=1,
        description="Hard cap on generated tokens; None: up to the context length (the gateway always sets it "
        "when it tokenizes, and leaves it to servers that tokenize themselves otherwise).",
    )
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, description="Stop strings, excluded from the output.")
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = Field(default=False, description="Keep generating past EOS (for benchmarks).")
    logprobs: int | None = Field(
        default=None, ge=0, le=20,
        description="Return each generated token's log-probability and this many most likely alternatives.",
    )


class EngineRequest(BaseModel):
    """One generation request as an engine receives it."""

    request_id: str
    model: str
    prompt_token_ids: list[int] = Field(
        default_factory=list,
        description="The prompt, tokenized by the gateway. Empty when the server tokenizes (no tokenizer at "
        "the gateway): then `chat_messages` or `prompt` carries the prompt.",
    )
    # Not `messages`: Ray's PrefixCacheAffinityRouter reads the first of `messages`/`prompt` it finds.
    chat_messages: list[dict[str, str]] | None = Field(
        default=None,
        description="A chat's messages, for a server that applies its own chat template (no tokenizer at "
        "the gateway).",
    )
    prompt_tokens_estimate: int | None = Field(
        default=None, ge=0, description="The prompt's approximate length when the gateway did not tokenize it."
    )
    block_hashes: list[int] = Field(
        default_factory=list,
        description="The router's keys for the prompt's full blocks (vLLM's hashes, low 64 bits), used "
        "for routing; engines hash the prompt themselves, as vLLM does.",
    )
    sampling: SamplingParams
    lora_name: str | None = Field(default=None, description="The LoRA adapter to generate with (its served name).")
    lora_path: str | None = Field(
        default=None, description="Where the engines read the adapter from; vLLM folds it into block hashes.")
    cache_salt: str | None = Field(
        default=None, description="Isolates this request's prefix cache entries (vLLM's cache_salt)."
    )
    prompt: str | None = Field(
        default=None,
        description="The prompt text. Servers that tokenize themselves get it as the completion prompt; "
        "Ray's PrefixCacheAffinityRouter baseline matches on it; engines ignore it.",
    )
    route: list[str] = Field(
        default_factory=list,
        description="Engine replica ids in the scheduler's order of preference; the Serve request "
        "router sends the request to the first that has room.",
    )
    priority: int = Field(default=0, description="Lower runs first under the priority policy, as in vLLM.")
    kv_transfer_params: dict[str, Any] | None = Field(
        default=None,
        description="Prefill/decode hand-off, vLLM semantics: `do_remote_decode` asks a prefill engine "
        "to return params; `do_remote_prefill` tells a decode engine to pull the KV cache.",
    )

    @property
    def num_prompt_tokens(self) -> int:
        """The prompt's length in tokens: exact when the gateway tokenized it, else the estimate."""
        return len(self.prompt_token_ids) or self.prompt_tokens_estimate or 0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    token_id: int | None = None


class TokenLogprob(BaseModel):
    """One generated token's log-probability, with the most likely alternatives at its position."""

    token: str
    logprob: float
    token_id: int | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class EngineOutput(BaseModel):
    """A piece of one request's output: new tokens and text since the previous piece."""

    request_id: str
    token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = Field(default=None, description="The stop string or token that ended it.")
    num_prompt_tokens: int = 0
    num_cached_tokens: int = Field(default=0, description="Prompt tokens served from the prefix cache.")
    num_output_tokens: int | None = Field(
        default=None,
        description="Tokens generated so far, from the server's usage, when token_ids are not given (a server "
        "that tokenizes itself); set on the final output.",
    )
    logprobs: list[TokenLogprob] | None = Field(
        default=None, description="One entry per token in token_ids, when the request asked for logprobs."
    )
    kv_transfer_params: dict[str, Any] | None = None
    replica_id: str | None = Field(
        default=None, description="The engine replica that produced it (set on a stream's first output)."
    )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_outputs(outputs: Sequence[EngineOutput]) -> EngineOutput:
    """Coalesce consecutive outputs of one request into one (fewer messages, same content)."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    token_ids: list[int] = []
    for output in outputs:
        token_ids.extend(output.token_ids)
    logprobs: list[TokenLogprob] | None = None
    if any(output.logprobs is not None for output in outputs):
        logprobs = [entry for output in outputs for entry in output.logprobs or []]
    first = outputs[0]
    return last.model_copy(
        update={
            "token_ids": token_ids,
            "text": "".join(output.text for output in outputs),
            "logprobs": logprobs,
            "replica_id": first.replica_id or last.replica_id,
        }
    )


class EngineRequestRejected(ValueError):
    """The engine can never run this request as given (too long for its context, a feature it lacks)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # kept across pickling: BaseException.__reduce__ carries __dict__


class EngineUnavailableError(RuntimeError):
    """The engine failed or went away while serving; the request may succeed on another replica."""


class EngineOverloaded(EngineUnavailableError):
    """The engine refused the request for load (or every engine tried did, or the gateway's own queue
    for the model is full): 503 engine_overloaded, with Retry-After."""


class CacheConfig(BaseModel):
    """The engine's KV cache geometry (vLLM's `vllm:cache_config_info`)."""

    block_size: int
    num_gpu_blocks: int
    prefix_caching_hash_algo: str = "sha256"
    hash_seed: str = Field(default="0", description="NONE_HASH seed (PYTHONHASHSEED of the engine process).")
    enable_prefix_caching: bool = True


class PrefixCacheCounters(BaseModel):
    """vLLM's prefix-cache counters (prompt tokens, monotonic)."""

    prefix_cache_queries: int = Field(default=0, description="Prompt tokens looked up in the prefix cache.")
    prefix_cache_hits: int = Field(default=0, description="Prompt tokens found in the prefix cache.")
    external_prefix_cache_queries: int = Field(default=0, description="Prompt tokens looked up through a KV connector.")
    external_prefix_cache_hits: int = Field(default=0, description="Prompt tokens received through a KV connector.")


class EngineCounters(PrefixCacheCounters):
    """Every monotonic counter of vLLM's that the gateway reads (token counts unless named otherwise)."""

    prompt_tokens: int = Field(default=0, description="Prefill tokens processed.")
    generation_tokens: int = Field(default=0, description="Generation tokens processed.")
    request_success: int = Field(default=0, description="Requests that finished.")
    num_preemptions: int = Field(default=0, description="Preemptions of running requests.")


class AdapterLoad(BaseModel):
    """An engine's LoRA adapters, as vLLM's `vllm:lora_requests_info` tells them (plus, where the engine
    says, which adapters sit in its slots)."""

    max_loras: int = Field(default=0, ge=0, description="Adapter slots.")
    running: list[str] = Field(default_factory=list, description="Adapters of running requests.")
    waiting: list[str] = Field(default_factory=list, description="Adapters of requests waiting to run.")
    loaded: list[str] | None = Field(
        default=None, description="Adapters in the slots, including idle ones (the simulator says; vLLM does not).")
    loads: int = Field(default=0, description="Adapter loads so far (the simulator's count).")
    evictions: int = Field(default=0, description="Adapters evicted from a slot so far (the simulator's count).")
    served: list[str] | None = Field(
        default=None, description="Adapters the engine can serve now, loaded or not (an engine replica the gateway "
        "runs says; None: unknown, as for external servers). Routers send an adapter's requests only where listed.")


class EngineLoad(PrefixCacheCounters):
    """What routers read of an engine: its load and prefix-cache counters, named as vLLM's metrics are."""

    model_config = ConfigDict(extra="ignore")

    num_requests_running: int = Field(default=0, description="Requests in the running batch.")
    num_requests_waiting: int = Field(default=0, description="Requests waiting to be scheduled.")
    kv_cache_usage_perc: float = Field(default=0.0, ge=0.0, le=1.0, description="Fraction of KV blocks in use.")
    adapters: AdapterLoad | None = Field(default=None, description="LoRA adapters; None for an engine without.")
    timestamp: float = Field(default=0.0, description="Wall-clock time of the snapshot (seconds since the epoch).")

    def signature(self) -> tuple[object, ...]:
        """Everything but the time of the snapshot: equal signatures mean nothing changed."""
        return (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc,
                self.prefix_cache_queries, self.prefix_cache_hits, self.external_prefix_cache_queries,
                self.external_prefix_cache_hits, self.adapters)


class EngineStats(EngineLoad, EngineCounters):
    """A snapshot of an engine: its load, every counter and its cache geometry."""

    engine_id: str
    model: str
    cache_config: CacheConfig

    def load(self) -> EngineLoad:
        """The part routers read (what crosses to the state actor)."""
        return EngineLoad.model_construct(**{name: getattr(self, name) for name in EngineLoad.model_fields})


@runtime_checkable
class Engine(Protocol):
    """What the gateway needs from an engine.

    Every engine also serves its own OpenAI API, which ingresses relay answers from: either it has an
    `endpoint_url` once started (a vLLM server), or an `async serve_http(node_ip) -> str | None` that the
    replica calls to start one (the simulator)."""

    engine_id: str

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream outputs; the last one has a finish_reason. Closing the iterator aborts the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def take_kv_events(self) -> list[bytes]:
        """KV-event batches published since the last call, each a vLLM msgpack payload frame."""
        ...

    def cached_block_hashes(self) -> list[int] | None:
        """Every block now in the prefix cache, for rebuilding a router's index; None if unknown."""
        ...

    def stats(self) -> EngineStats: ...

    @property
    def cache_config(self) -> CacheConfig: ...

    @property
    def healthy(self) -> bool:
        """False once the engine can no longer serve (its loop or process died)."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...
