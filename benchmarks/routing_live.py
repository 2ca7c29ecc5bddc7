"""Routing policies measured live: the Ray Serve gateway with simulated engine replicas and an
open-loop (Poisson) streaming load generator, one policy after another on identical fresh fleets
and the identical request sequence.

Engines run in slow motion (`--time-scale`, wall seconds per modelled second) so that a 2-core
machine can drive a fleet into saturation without the load generator and the gateway themselves
running out of CPU: the modelled engines are the bottleneck, as GPUs are in production.

    .venv/bin/python benchmarks/routing_live.py --replicas 8 --rates 4,8
    .venv/bin/python benchmarks/routing_live.py --vllm-model models/tiny-llama --replicas 2 ...   # real vLLM CPU
    .venv/bin/python benchmarks/routing_live.py --workload multi_adapter --adapters 32 --max-loras 4 \
        --policies round_robin,prefix_only,prefix_aware     # LoRA adapters with Zipf popularity

Reported per policy: TTFT p50/p90/p99 and end-to-end p50 (client side, wall seconds), output
tokens/s, prefix hit rate (prompt tokens the engines served from cache, from the usage of each
response; and vLLM's own vllm:prefix_cache_hits / queries counters as engine_hit_rate), and spread
(most prompt tokens on one replica over the mean, from the engines' counters); with adapters, the
engines' adapter loads per 1,000 requests. Policy `prefix_only` is ours without the adapter scorer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx
import numpy as np

from benchmarks.routing_sim import PREFIX_ONLY
from tests.helpers import free_port, wait_for, wait_until_ready

MODEL = "sim-llama"
POLICIES = ("round_robin", "power_of_two", "ray_prefix_cache_affinity", "prefix_aware")
WORDS = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta", "lambda", "zeta",
         "router", "cache", "prefix", "token", "engine", "replica", "queue", "batch", "block", "model"]


@dataclass
class Sample:
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


@dataclass
class Workload:
    arrivals: list[float]
    prompts: list[list[dict]] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    """The model (or adapter) each request names; empty: all the base model."""


def multi_adapter(adapters: int, requests: int, system_words: int, question_words: int, rate: float,
                  seed: int, zipf: float = 1.0) -> Workload:
    """Requests for LoRA adapters with Zipf popularity, each adapter with its own system prompt."""
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(system_words)) for _ in range(adapters)]
    weights = [1.0 / (k + 1) ** zipf for k in range(adapters)]
    t, workload = 0.0, Workload([])
    for n in range(requests):
        t += rng.expovariate(rate)
        a = rng.choices(range(adapters), weights)[0]
        question = f"Question {n}: " + " ".join(rng.choice(WORDS) for _ in range(question_words))
        workload.arrivals.append(t)
        workload.prompts.append([{"role": "system", "content": systems[a]}, {"role": "user", "content": question}])
        workload.models.append(f"lora-{a}")
    return workload


def shared_prefix(groups: int, per_group: int, system_words: int, question_words: int, rate: float,
                  seed: int) -> Workload:
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(system_words)) for _ in range(groups)]
    order = [g for g in range(groups) for _ in range(per_group)]
    rng.shuffle(order)
    t, workload = 0.0, Workload([])
    for n, g in enumerate(order):
        t += rng.expovariate(rate)
        question = f"Question {n}: " + " ".join(rng.choice(WORDS) for _ in range(question_words))
        workload.arrivals.append(t)
        workload.prompts.append([{"role": "system", "content": systems[g]}, {"role": "user", "content": question}])
    return workload


async def stream_chat(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int,
                      model: str | None = None) -> tuple[Sample, str]:
    """One streamed chat request: its timings and usage, and the answer's text."""
    sample, text = Sample(), []
    body = {"model": model or MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return sample, ""
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    sample.error = str(chunk["error"])[:200]
                    return sample, ""
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    sample.prompt_tokens = usage["prompt_tokens"]
                    sample.output_tokens = usage["completion_tokens"]
                    sample.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                choices = chunk.get("choices") or []
                content = choices[0].get("delta", {}).get("content") if choices else None
                if content:
                    text.append(content)
                    if sample.ttft_s is None:
                        sample.ttft_s = time.perf_counter() - start
    except httpx.HTTPError as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
        return sample, ""
    sample.e2e_s = time.perf_counter() - start
    return sample, "".join(text)


async def run_open_loop(url: str, workload: Workload, max_tokens: int) -> tuple[list[Sample], float]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()

        async def at(offset: float, messages: list[dict], model: str | None) -> Sample:
            await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
            return (await stream_chat(client, url, messages, max_tokens, model))[0]

        models = workload.models or [None] * len(workload.arrivals)
        samples = await asyncio.gather(*(at(t, m, model) for t, m, model
                                         in zip(workload.arrivals, workload.prompts, models, strict=True)))
        return list(samples), time.perf_counter() - started


def app_config(args: argparse.Namespace, policy: str) -> dict:
    engine = {"time_scale": args.time_scale, "num_blocks": args.num_blocks, "max_num_seqs": 64}
    if args.workload == "multi_adapter":
        engine |= {"max_loras": args.max_loras, "lora_load_s": args.lora_load_s}
    if args.vllm_model:
        engine = {"kind": "vllm", "model": args.vllm_model, "device": "cpu", "dtype": "float32", "enforce_eager": True,
                  "block_size": 32, "max_num_seqs": 8, "max_num_batched_tokens": 1024, "cpu_kv_cache_gib": 1,
                  "cpu_threads": 1}
    return {
        "models": [{
            "name": MODEL,
            "max_model_len": 1024 if args.vllm_model else 8192,
            "engine": engine,
            "deployment": {"num_replicas": args.replicas, "max_ongoing_requests": 1000},
            "adapters": ([{"name": f"lora-{a}"} for a in range(args.adapters)]
                         if args.workload == "multi_adapter" else []),
        }],
        "ingress": {"num_replicas": 1, "listen": {"host": "127.0.0.1", "port": args.listen_port}},
        "routing": PREFIX_ONLY if policy == "prefix_only" else {"policy": policy},
    }


def engine_counters(app: str) -> dict[str, dict]:
    import ray

    from app.deployments.state_actor import NAMESPACE, actor_name

    actor = ray.get_actor(actor_name(app), namespace=NAMESPACE)
    return ray.get(actor.describe.remote(), timeout=10)["replicas"]


def engines_registered(app: str) -> int:
    try:
        return len(engine_counters(app))
    except Exception:  # the actor is created by the first engine replica; not there yet
        return 0


def summarize(policy: str, rate: float, samples: list[Sample], wall_s: float, counters: dict[str, dict],
              warmup: float) -> dict:
    measured = samples[int(len(samples) * warmup):]
    ok = [s for s in measured if s.error is None and s.ttft_s is not None]
    ttft = np.array([s.ttft_s for s in ok])
    e2e = np.array([s.e2e_s for s in ok])
    queries = np.array([c["stats"]["prefix_cache_queries"] for c in counters.values()], dtype=float)
    hits = np.array([c["stats"]["prefix_cache_hits"] for c in counters.values()], dtype=float)
    loads = sum((c["stats"].get("adapters") or {}).get("loads", 0) for c in counters.values())
    return {
        "policy": policy, "rate": rate, "requests": len(samples), "measured": len(measured),
        "errors": sum(s.error is not None for s in samples),
        "first_error": next((s.error for s in samples if s.error), None),
        "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p90": float(np.percentile(ttft, 90)),
        "ttft_p99": float(np.percentile(ttft, 99)), "e2e_p50": float(np.percentile(e2e, 50)),
        "output_tok_s": sum(s.output_tokens for s in samples) / wall_s,
        "hit_rate": sum(s.cached_tokens for s in ok) / max(1, sum(s.prompt_tokens for s in ok)),
        "engine_hit_rate": float(hits.sum() / queries.sum()) if queries.sum() else None,
        "spread_max_over_mean": float(queries.max() / queries.mean()) if queries.size and queries.mean() else None,
        "replicas_reporting": len(counters),
        "adapter_loads_per_1k": 1000 * loads / len(samples),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--rates", default="4,8", help="wall-clock requests per second, comma separated")
    p.add_argument("--workload", choices=("shared_prefix", "multi_adapter"), default="shared_prefix")
    p.add_argument("--adapters", type=int, default=32, help="multi_adapter: adapters, Zipf popularity")
    p.add_argument("--requests", type=int, default=600, help="multi_adapter: requests")
    p.add_argument("--max-loras", type=int, default=4, help="multi_adapter: adapter slots per engine")
    p.add_argument("--lora-load-s", type=float, default=0.05, help="multi_adapter: modelled seconds to load one")
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--prompts-per-group", type=int, default=8)
    p.add_argument("--system-words", type=int, default=1000)
    p.add_argument("--question-words", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--time-scale", type=float, default=25.0)
    p.add_argument("--num-blocks", type=int, default=1024, help="KV blocks per engine replica")
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append results to this JSON list")
    p.add_argument("--vllm-model", help="a model folder: real vLLM CPU engines instead of simulated ones")
    args = p.parse_args()
    args.listen_port = free_port()  # each policy's app in turn listens here
    global MODEL
    if args.vllm_model:
        MODEL = "tiny-llama"
        args.vllm_model = os.path.abspath(args.vllm_model)

    import ray
    from ray import serve

    from app.config import parse_gateway_config
    from app.deployments.builder import build_gateway

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for rate in [float(r) for r in args.rates.split(",")]:
            if args.workload == "multi_adapter":
                workload = multi_adapter(args.adapters, args.requests, args.system_words, args.question_words,
                                         rate, args.seed)
            else:
                workload = shared_prefix(args.groups, args.prompts_per_group, args.system_words,
                                         args.question_words, rate, args.seed)
            for policy in args.policies.split(","):
                app = f"live-{policy.replace('_', '-')}-{int(rate * 10)}"
                serve.run(build_gateway(parse_gateway_config(app_config(args, policy))), name=app,
                          route_prefix=f"/{app}")
                base = f"http://127.0.0.1:{args.listen_port}"  # the app's own listener
                wait_until_ready(f"{base}/v1/models", timeout_s=120)
                wait_for(lambda app=app: engines_registered(app) == args.replicas, timeout_s=300)
                samples, wall_s = asyncio.run(run_open_loop(f"{base}/v1/chat/completions", workload,
                                                            args.max_tokens))
                row = summarize(policy, rate, samples, wall_s, engine_counters(app), args.warmup)
                row.update(replicas=args.replicas, time_scale=args.time_scale, num_blocks=args.num_blocks)
                rows.append(row)
                print(f"live x{args.replicas} rate {rate:5.1f}/s {policy:26s} TTFT p50 {row['ttft_p50']:6.3f}s "
                      f"p90 {row['ttft_p90']:6.3f}s p99 {row['ttft_p99']:6.3f}s  e2e p50 {row['e2e_p50']:6.2f}s  "
                      f"out {row['output_tok_s']:6.1f} tok/s  hit {row['hit_rate']:.3f}  "
                      f"engine hit {row['engine_hit_rate'] or 0:.3f}  spread {row['spread_max_over_mean']:.2f}  "
                      f"loads/1k {row['adapter_loads_per_1k']:.0f}  errors {row['errors']}", flush=True)
                serve.delete(app)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
