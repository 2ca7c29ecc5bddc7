"""Settings of the simulated engine, with the defaults and meaning of every knob."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StepTimeConfig(BaseModel):
    """The cost model of one engine step (one forward pass over the scheduled batch).

    step_time = step_overhead_s
              + prefill_s_per_token * (prompt tokens computed in the step)
              + decode_s_per_seq    * (sequences decoding one token in the step)
              + kv_transfer_s_per_block * (KV blocks pulled from a remote prefill engine)

    The defaults are of the order of an 8B model in bf16 on one H100: about 20k prefill tokens/s,
    a 6 ms decode step at batch 1 that grows by 0.1 ms per extra sequence.
    """

    model_config = ConfigDict(extra="forbid")

    step_overhead_s: float = Field(default=0.006, ge=0.0, description="Fixed cost of any step.")
    prefill_s_per_token: float = Field(default=0.00005, ge=0.0)
    decode_s_per_seq: float = Field(default=0.0001, ge=0.0)
    kv_transfer_s_per_block: float = Field(default=0.00002, ge=0.0)


class SimulatedEngineConfig(BaseModel):
    """A simulated vLLM engine."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["simulated"] = "simulated"
    block_size: int = Field(default=16, ge=1, description="Tokens per KV block (vLLM's --block-size).")
    num_blocks: int = Field(default=4096, ge=1, description="KV cache capacity in blocks.")
    max_num_seqs: int = Field(default=64, ge=1, description="Most sequences in one batch.")
    max_num_batched_tokens: int = Field(
        default=2048, ge=1, description="Token budget per step; longer prompts are prefilled in chunks."
    )
    enable_prefix_caching: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    max_loras: int = Field(
        default=4, ge=1,
        description="LoRA adapter slots (vLLM's --max-loras): the most adapters one batch can use. A request "
        "whose adapter would need a slot while every slot serves running requests waits, as in vLLM.",
    )
    lora_load_s: float = Field(
        default=0.05, ge=0.0,
        description="Modelled seconds to load an adapter into a slot (a rank-16 adapter of an 8B model from "
        "host memory onto one GPU, tens of milliseconds), added to the step that loads it. The least recently "
        "used idle adapter is evicted when the slots are full.",
    )
    step_time: StepTimeConfig = Field(default_factory=StepTimeConfig)
    time_scale: float = Field(
        default=1.0,
        gt=0.0,
        description="Wall-clock seconds per modelled second: 0.1 runs ten times faster than real time.",
    )
    mean_output_tokens: float = Field(
        default=256.0,
        gt=0.0,
        description="Mean length of an answer when the model stops on its own (EOS); requests with "
        "ignore_eos run to max_tokens.",
    )
    seed: int = Field(default=0, description="Seeds sampling, so runs are reproducible.")
    hash_algo: Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"] = Field(
        default="sha256", description="Block-hash algorithm (vLLM: --prefix-caching-hash-algo)."
    )
    hash_seed: str = Field(default="0", description="Seed of the block-hash chain (vLLM: PYTHONHASHSEED).")
    server_host: str | None = Field(
        default="127.0.0.1",
        description="Where an engine replica serves the engine's OpenAI API over HTTP, as a vLLM replica does, "
        "so ingresses relay its answers straight from it: 127.0.0.1 reaches ingresses on the same node, 0.0.0.0 "
        "every node. null: no server; requests go through the replica's Serve handle (a Ray hop per chunk).",
    )

    @field_validator("hash_seed", mode="before")
    @classmethod
    def _seed_as_string(cls, value: object) -> object:
        # PYTHONHASHSEED is an environment string; accept the natural `hash_seed: 0` in YAML too.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value
