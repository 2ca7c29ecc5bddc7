#!/usr/bin/env bash
# Every simulator run behind the tables in benchmarks/README.md; results land in benchmarks/results/.
# About 40 minutes on one core of the 2-core development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
sim() { local name=$1; shift; rm -f "$OUT/$name.json"; "$PY" benchmarks/routing_sim.py --json "$OUT/$name.json" "$@"; }

sim sim-x8-shared-prefix       --replicas 8   --workload shared_prefix --rates 40,60,80,100,120
sim sim-x8-low-cache           --replicas 8   --workload low_cache     --rates 30,50,70
sim sim-x8-multi-turn          --replicas 8   --workload multi_turn    --rates 8,16,24
sim sim-x8-shared-prefix-tight --replicas 8   --workload shared_prefix --rates 60,80 --num-blocks 4096
sim sim-x32-shared-prefix      --replicas 32  --workload shared_prefix --rates 240,320,400
sim sim-x128-shared-prefix     --replicas 128 --workload shared_prefix --rates 1280,1600 --groups 1024
