#!/usr/bin/env bash
# Starts the gateway on the default local config (simulated engines, no GPU) on http://127.0.0.1:8000,
# or on the Serve config file given. Clients reach the ingress replicas' own listener (ingress.listen).
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-configs/local.yaml}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
exec .venv/bin/serve run "$config"
