#!/usr/bin/env bash
# Starts the gateway on the default local config (simulated engines, no GPU) on http://127.0.0.1:8000,
# or on the Serve config file given.
#   GATEWAY_DIRECT_INGRESS=1 scripts/run-local.sh [FILE]   also serve HTTP from the ingress replica
#       itself, with no Serve proxy in front, on port 8001 (http_options.port + 1, or
#       GATEWAY_DIRECT_INGRESS_PORT); one node, one ingress replica. See the README.
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-configs/local.yaml}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
if [[ "${GATEWAY_DIRECT_INGRESS:-0}" == "1" ]]; then
    # Ray reads these when its processes start, so they must be set before `serve run` starts Ray.
    settings="$(.venv/bin/python -m app.config direct-ingress-env "$config" ${GATEWAY_DIRECT_INGRESS_PORT:-})"
    eval "$settings"
fi
exec .venv/bin/serve run "$config"
