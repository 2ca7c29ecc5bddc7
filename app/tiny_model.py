"""Builds a tiny Llama with random weights that real vLLM can serve, with no download.

`python -m app.tiny_model OUT_DIR` writes a Hugging Face style model folder in about a second:
`config.json` (LlamaForCausalLM), `model.safetensors` (seeded random weights), `generation_config.json`
and the project's built-in tokenizer (byte-level BPE with a ChatML chat template). Its answers are
gibberish, but serving it is real vLLM work: prefill, decode, prefix caching and KV transfer,
deterministic at temperature 0. Tests and the CPU configs use it.

vLLM's CPU attention needs a head size of at least 32, so the defaults use 4 heads of 32.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer


class TinyLlamaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(default=128, ge=32)
    intermediate_size: int = Field(default=256, ge=1)
    num_hidden_layers: int = Field(default=2, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    num_key_value_heads: int = Field(default=2, ge=1)
    max_position_embeddings: int = Field(default=4096, ge=16)
    init_std: float = Field(
        default=0.5,
        gt=0,
        description="Std of the random weights. Large enough that each next token depends on the context "
        "(at the usual 0.02 the model repeats one token forever, which would hide a misplaced KV block).",
    )
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _weights(spec: TinyLlamaSpec, vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    h, i, kv = spec.hidden_size, spec.intermediate_size, spec.num_key_value_heads * spec.head_dim

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * spec.init_std).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(vocab_size, h), "model.norm.weight": np.ones(h, np.float32)}
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}."
        tensors |= {
            p + "self_attn.q_proj.weight": normal(h, h),
            p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h),
            p + "self_attn.o_proj.weight": normal(h, h),
            p + "mlp.gate_proj.weight": normal(i, h),
            p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        }
    return tensors


def build_tiny_model(out_dir: str | Path, spec: TinyLlamaSpec | None = None) -> Path:
    """Write the model folder (replacing an earlier one) and return its path."""
    from safetensors.numpy import save_file

    spec = spec or TinyLlamaSpec()
    if spec.hidden_size % spec.num_attention_heads or spec.num_attention_heads % spec.num_key_value_heads:
        raise ValueError("hidden_size must split evenly into heads, and heads evenly into KV heads")
    if spec.head_dim < 32:
        raise ValueError(f"head_dim is {spec.head_dim}; vLLM's CPU attention needs at least 32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(BUILTIN_TOKENIZER_DIR / name, out / name)
    tokenizer = PromptTokenizer.from_dir(out)
    bos = tokenizer.encode("", add_special_tokens=True)
    bos_id = bos[0] if bos else None
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": bos_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_id, "eos_token_id": tokenizer.eos_token_id}, indent=1)
    )
    weights = out / "model.safetensors"
    save_file(_weights(spec, tokenizer.vocab_size), str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; a server running as another user must read it
    return out


def build_tiny_lora(out_dir: str | Path, spec: TinyLlamaSpec | None = None, *, rank: int = 8, seed: int = 1,
                    init_std: float = 0.5) -> Path:
    """Write a PEFT LoRA adapter for the tiny model (`spec`: the base model's): random low-rank weights on
    the attention projections, strong enough that the base model's greedy answers change. vLLM loads it
    with `--lora-modules name=out_dir` or `/v1/load_lora_adapter`."""
    from safetensors.numpy import save_file

    spec = spec or TinyLlamaSpec()
    rng = np.random.default_rng(seed)
    h, kv = spec.hidden_size, spec.num_key_value_heads * spec.head_dim
    tensors = {}
    for layer in range(spec.num_hidden_layers):
        for projection, width in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}."
            tensors[prefix + "lora_A.weight"] = (rng.standard_normal((rank, h)) * init_std).astype(np.float32)
            tensors[prefix + "lora_B.weight"] = (rng.standard_normal((width, rank)) * init_std).astype(np.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "adapter_model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "base_model_name_or_path": "tiny-llama",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder to write (created or overwritten)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--lora", nargs="*", default=[], metavar="NAME",
                        help="also write LoRA adapters for it, each in OUT_DIR-lora/NAME (seeded by its position)")
    args = parser.parse_args()
    spec = TinyLlamaSpec(seed=args.seed, num_hidden_layers=args.layers, hidden_size=args.hidden_size)
    print(build_tiny_model(args.out_dir, spec))
    for i, name in enumerate(args.lora):
        print(build_tiny_lora(Path(f"{str(args.out_dir).rstrip('/')}-lora") / name, spec, seed=i + 1))


if __name__ == "__main__":
    main()
