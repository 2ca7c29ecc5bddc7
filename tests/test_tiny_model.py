import json

import pytest
from safetensors.numpy import load_file

from app.tiny_model import TinyLlamaSpec, build_tiny_model
from app.tokenizer import PromptTokenizer


def test_tiny_model_is_a_complete_llama_folder_with_a_chat_tokenizer(tmp_path):
    out = build_tiny_model(tmp_path / "tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] >= 32  # vLLM's CPU attention rejects smaller heads
    tokenizer = PromptTokenizer.from_dir(out)
    assert config["vocab_size"] == tokenizer.vocab_size and config["eos_token_id"] == tokenizer.eos_token_id
    prompt = tokenizer.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")

    weights = load_file(str(out / "model.safetensors"))
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], hidden)
    assert weights[f"model.layers.{layers - 1}.self_attn.k_proj.weight"].shape == (kv, hidden)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (hidden, config["intermediate_size"])
    assert "lm_head.weight" not in weights  # tied to the embeddings
    assert len(weights) == 2 + 9 * layers


def test_tiny_model_is_reproducible_from_its_seed(tmp_path):
    a = load_file(str(build_tiny_model(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(build_tiny_model(tmp_path / "b") / "model.safetensors"))
    c = load_file(str(build_tiny_model(tmp_path / "c", TinyLlamaSpec(seed=1)) / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["model.embed_tokens.weight"] == c["model.embed_tokens.weight"]).all()


def test_tiny_model_refuses_heads_vllm_cpu_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="at least 32"):
        build_tiny_model(tmp_path / "x", TinyLlamaSpec(hidden_size=64, num_attention_heads=4))
