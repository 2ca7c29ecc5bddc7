#!/usr/bin/env bash
# Runs the whole test suite (unit, Ray Serve integration, and the README's `serve run` command).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest "$@"
