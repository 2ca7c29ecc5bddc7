"""What the gateway costs on real vLLM (CPU build, the tiny test model), measured two ways.

    .venv/bin/python -m app.tiny_model models/tiny-llama
    .venv/bin/python benchmarks/vllm_overhead.py overhead --requests 100     # gateway vs vLLM direct
    .venv/bin/python benchmarks/vllm_overhead.py overhead --via-engine-replica   # ... the older path
    .venv/bin/python benchmarks/vllm_overhead.py split --requests 30          # the prefill/decode hop
    .venv/bin/python benchmarks/vllm_overhead.py overhead --path proxy        # through Serve's HTTP proxy

overhead: one engine replica; the same streaming chat request sent to its vLLM server directly
(the server the replica manages, so the engine and its cache are identical) and through the gateway
(the ingress replica's own listener -> vLLM's server, the default path; `--path proxy`: Serve's HTTP
proxy -> ingress -> vLLM's server; with --via-engine-replica, ... ingress -> engine replica -> vLLM),
closed loop at each concurrency.

split: two models in one app on the same weights, one mixed engine and a 1 prefill + 1 decode pair
(`min_split_tokens: 0`, so every request splits); unique long prompts (no cache hits) one at a time;
the hop is the TTFT difference, and the gateway's own prefill-hop histogram.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx

from benchmarks.loadgen import LoadResult, _one, run_load
from tests.helpers import free_port, metric_value, wait_for

PROMPT = "Explain how a prefix cache helps a gateway route requests. " * 4
WORDS = "amber basil cedar delta ember fjord garnet hazel indigo juniper kelp lilac".split()


ENGINE_SETTINGS: dict = {}
"""--engine-set KEY=JSON: engine settings to compare, applied to every engine of the run."""


def engine(model_dir: str, **extra) -> dict:
    return {"kind": "vllm", "model": model_dir, "device": "cpu", "dtype": "float32", "enforce_eager": True,
            "block_size": 32, "max_num_seqs": 8, "max_num_batched_tokens": 1024, "cpu_kv_cache_gib": 1,
            "cpu_threads": 1, **ENGINE_SETTINGS, **extra}


def row(target: str, concurrency: int, s: dict[str, float]) -> str:
    return (f"| {target} | {concurrency} | {s['requests']} | {s['errors']} | {s['ttft_p50_ms']:.1f} | "
            f"{s['ttft_p99_ms']:.1f} | {s['itl_mean_ms']:.2f} | {s['e2e_p50_ms']:.1f} | {s['req_per_s']:.2f} |")


PATH = "listen"
"""--path: how clients reach the gateway: `listen` (its ingress replica's own listener, the default) or
`proxy` (Serve's HTTP proxy)."""


def start(config: dict, replicas: int | None = None) -> int:
    """Starts the gateway and waits for `replicas` (default: the engine replicas the config runs) to
    register; returns the port clients use (see PATH)."""
    import ray
    from ray import serve

    from app.config import parse_gateway_config
    from app.deployments.builder import build_gateway

    port = free_port()
    listen_port = free_port()
    ingress = config.setdefault("ingress", {})
    ingress["listen"] = {"host": "127.0.0.1", "port": listen_port} if PATH == "listen" else None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_gateway(parse_gateway_config(config)), name="gateway", route_prefix="/")
    if replicas is None:
        replicas = sum(2 if m.get("disaggregation") else m["deployment"]["num_replicas"] for m in config["models"])
    handle = serve.get_app_handle("gateway")
    assert wait_for(lambda: len(handle.routing_state.remote().result()["replicas"]) == replicas, timeout_s=300)
    return listen_port if PATH == "listen" else port


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def overhead(args: argparse.Namespace) -> None:
    from ray import serve

    port = start({"models": [{"name": "tiny-llama", "max_model_len": 1024, "engine": engine(args.model),
                              "deployment": {"num_replicas": 1}}],
                  "ingress": {"stream_from_engines": not args.via_engine_replica}})
    try:
        direct = serve.get_deployment_handle("engine-tiny-llama", app_name="gateway").engine_url.remote().result()
        gateway = f"http://127.0.0.1:{port}"
        print("| target | concurrency | requests | errors | TTFT p50 ms | TTFT p99 ms | ITL mean ms | e2e p50 ms "
              "| req/s |\n|---|---|---|---|---|---|---|---|---|")
        for concurrency in args.concurrency:
            for target, url in (("vLLM direct", direct), ("gateway", gateway)) * args.rounds:
                result = asyncio.run(run_load(url, model="tiny-llama", concurrency=concurrency,
                                              requests=args.requests, prompt=PROMPT, max_tokens=args.max_tokens))
                print(row(target, concurrency, result.summary()), flush=True)
    finally:
        stop()


async def _sequential(url: str, model: str, prompts: list[str], max_tokens: int) -> LoadResult:
    result = LoadResult()
    async with httpx.AsyncClient(timeout=300) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for prompt in prompts:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            await _one(client, url + "/v1/chat/completions", body, result)
        result.wall_s = loop.time() - started
    return result


def split(args: argparse.Namespace) -> None:
    mixed = {"name": "tiny-mixed", "max_model_len": 1024, "engine": engine(args.model),
             "deployment": {"num_replicas": 1}}
    transfer = {"connector": args.connector}
    if args.connector == "shared_storage":
        transfer["shared_storage_path"] = "/tmp/gateway-kv-bench"
    pd = {"name": "tiny-split", "max_model_len": 1024, "engine": engine(args.model, kv_transfer=transfer),
          "deployment": {"num_replicas": 0},
          "disaggregation": {"prefill": {"num_replicas": 1}, "decode": {"num_replicas": 1}, "min_split_tokens": 0}}
    port = start({"models": [mixed, pd]})
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(0)

    def prompts(tag: str) -> list[str]:  # all different from the first block on
        return [f"{tag} {i} " + " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
                for i in range(args.requests)]

    try:
        asyncio.run(_sequential(url, "tiny-mixed", prompts("warm-m")[:3], args.max_tokens))
        asyncio.run(_sequential(url, "tiny-split", prompts("warm-s")[:3], args.max_tokens))
        print("| path | concurrency | requests | errors | TTFT p50 ms | TTFT p99 ms | ITL mean ms | e2e p50 ms "
              "| req/s |\n|---|---|---|---|---|---|---|---|---|")
        for model in ("tiny-mixed", "tiny-split") * args.rounds:
            result = asyncio.run(_sequential(url, model, prompts(model), args.max_tokens))
            label = "mixed (no split)" if model == "tiny-mixed" else f"split, {args.connector}"
            print(row(label, 1, result.summary()), flush=True)
        text = httpx.get(url + "/metrics").text
        hop_sum = metric_value(text, "gateway_disaggregation_prefill_seconds_sum")
        hop_count = metric_value(text, "gateway_disaggregation_prefill_seconds_count")
        print(f"\nprefill hop (gateway_disaggregation_prefill_seconds): mean {1000 * hop_sum / hop_count:.1f} ms "
              f"over {hop_count:.0f} splits")
    finally:
        stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overhead", "split"])
    parser.add_argument("--model", default="models/tiny-llama")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2, help="alternate the targets this many times")
    parser.add_argument("--prompt-words", type=int, default=180, help="about 800 tokens")
    parser.add_argument("--via-engine-replica", action="store_true",
                        help="overhead: stream through the engine replica (ingress.stream_from_engines: false)")
    parser.add_argument("--connector", choices=["nixl", "shared_storage"], default="nixl")
    parser.add_argument("--path", choices=["listen", "proxy"], default="listen",
                        help="clients reach the gateway on its own listener (default) or through Serve's proxy")
    parser.add_argument("--engine-set", action="append", default=[], metavar="KEY=JSON",
                        help="an engine setting for every engine, e.g. shm_poll_sleep_us=0 (repeatable)")
    args = parser.parse_args()
    global PATH
    PATH = args.path
    for setting in args.engine_set:
        key, _, value = setting.partition("=")
        ENGINE_SETTINGS[key] = json.loads(value)
    args.model = os.path.abspath(args.model)
    if args.what == "overhead":
        overhead(args)
    else:
        split(args)


if __name__ == "__main__":
    main()
