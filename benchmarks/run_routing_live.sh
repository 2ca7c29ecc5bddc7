#!/usr/bin/env bash
# The live 8-replica routing comparison behind benchmarks/README.md (about 20 minutes, 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" benchmarks/routing_live.py --replicas 8 --rates 3,6 --groups 48 --prompts-per-group 8 \
  --system-words 370 --question-words 45 --max-tokens 16 --time-scale 25 --num-blocks 1024 \
  --json benchmarks/results/live-x8-shared-prefix.json
