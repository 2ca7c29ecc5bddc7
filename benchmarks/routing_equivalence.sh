#!/usr/bin/env bash
# Shows a change to the routing code makes the same decisions: the simulator runs every policy on fixed
# seeds at REV (a git worktree) and at the working tree, and every ranking's digest must match.
#   benchmarks/routing_equivalence.sh REV        (about 16 minutes on the 2-core development machine)
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: $0 GIT_REVISION}
PY=$(pwd)/.venv/bin/python
WORK=$(mktemp -d)
git worktree add -q --detach "$WORK/before" "$REV"
trap 'git worktree remove --force "$WORK/before"; rm -rf "$WORK"' EXIT
run() {  # REPO OUT: the same runs for both; PYTHONPATH makes each import its own app/
  local repo=$1 out=$2; mkdir -p "$out"
  s() { local name=$1; shift; (cd "$repo" && PYTHONPATH="$repo" "$PY" benchmarks/routing_sim.py --json "$out/$name.json" "$@" >/dev/null); }
  s shared --replicas 8 --workload shared_prefix --rates 60,110 --groups 128
  s low    --replicas 8 --workload low_cache --rates 50 --groups 128
  s multi  --replicas 8 --workload multi_turn --rates 16 --conversations 256
  s tight  --replicas 8 --workload shared_prefix --rates 80 --num-blocks 2048 --groups 128 \
           --routing '{"saturated_kv_usage":0.9,"guard_load_ratio":1.5,"guard_load_slack":2}'
  s x32    --replicas 32 --workload shared_prefix --rates 320 --groups 512 --policies prefix_aware,power_of_two
}
run "$WORK/before" "$WORK/out-before"
run "$(pwd)" "$WORK/out-after"
"$PY" benchmarks/compare_routing_runs.py "$WORK/out-before" "$WORK/out-after"
