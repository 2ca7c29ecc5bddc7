"""What the gateway adds: the same simulated engine called directly versus through Ray Serve.

    .venv/bin/python benchmarks/gateway_overhead.py [--requests 200] [--max-tokens 32]

Target A: the standalone simulated engine server (`python -m app.engines.simulated`), one engine.
Target B: the gateway (its ingress replica's own listener -> the engine replica's simulated server, the
default path), same engine settings.
Both run in real time (time_scale 1), so engine work is identical; the difference is the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.loadgen import run_load
from tests.helpers import free_port, wait_until_ready

PROMPT = "Explain how a prefix cache helps a gateway route requests. " * 4


def _print_row(target: str, concurrency: int, summary: dict[str, float]) -> None:
    print(
        f"| {target} | {concurrency} | {summary['requests']} | {summary['errors']} | {summary['ttft_p50_ms']:.1f} | "
        f"{summary['ttft_p90_ms']:.1f} | {summary['itl_mean_ms']:.2f} | {summary['e2e_p50_ms']:.1f} | "
        f"{summary['req_per_s']:.1f} | {summary['output_tok_per_s']:.0f} |",
        flush=True,
    )


async def _measure(target: str, url: str, args: argparse.Namespace) -> None:
    for concurrency in args.concurrency:
        result = await run_load(url, model="sim-llama", concurrency=concurrency, requests=args.requests,
                                prompt=PROMPT, max_tokens=args.max_tokens)
        _print_row(target, concurrency, result.summary())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    print("| target | concurrency | requests | errors | TTFT p50 ms | TTFT p90 ms | ITL mean ms | e2e p50 ms "
          "| req/s | output tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    port = free_port()
    direct = subprocess.Popen([sys.executable, "-m", "app.engines.simulated", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/health")
        asyncio.run(_measure("engine direct", f"http://127.0.0.1:{port}", args))
    finally:
        direct.terminate()
        direct.wait(timeout=30)

    import ray
    from ray import serve

    from app.config import parse_gateway_config
    from app.deployments.builder import build_gateway

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        config = parse_gateway_config({"models": [{"name": "sim-llama", "deployment": {"num_replicas": 1}}],
                                       "ingress": {"listen": {"host": "127.0.0.1", "port": port}}})
        serve.run(build_gateway(config), name="gateway", route_prefix="/")
        wait_until_ready(f"http://127.0.0.1:{port}/v1/models")
        asyncio.run(_measure("gateway", f"http://127.0.0.1:{port}", args))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
