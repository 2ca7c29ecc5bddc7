"""Our gateway against the other open routers, on the same fleet of standalone simulated vLLM servers.

Each router is put in front of the same N servers (`python -m app.engines.simulated`, real processes
with vLLM's API, /metrics and ZMQ KV events), restarted before every run so each starts from empty
caches, and driven by the same request sequence:

- shared-prefix: `--groups` long system prompts, each with many different questions, arriving as a
  Poisson process at `--rate` requests/s (pick one that saturates round-robin);
- multi-turn chat: `--sessions` conversations of `--turns` turns each, starting as a Poisson process;
  each turn resends the whole conversation so far (the previous answers included) after a think time.

Routers: vllm-router (round_robin, power_of_two, cache_aware), sglang-router (cache_aware), and ours
(engine kind external, policy prefix_aware, with the servers' KV events). The two others come from
PyPI into their own virtual environment (`--routers-venv`):

    python3 -m venv /tmp/routers-venv && /tmp/routers-venv/bin/pip install vllm-router==0.1.17 sglang-router==0.3.2
    .venv/bin/python benchmarks/routers_head_to_head.py --routers-venv /tmp/routers-venv --json results.json

Reported per router and workload: TTFT p50/p90/p99 and end-to-end p50 (client side, after the first
`--warmup` share of requests), output tokens/s over the whole run, the prefix-cache hit rate the
servers report (vllm:prefix_cache_hits / queries), the spread of prompt tokens over the servers (most
over mean), and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx
import numpy as np

from benchmarks.routing_live import WORDS, Sample, Workload, run_open_loop, shared_prefix, stream_chat
from tests.helpers import SimServer, free_port, metric_value, wait_for, wait_until_ready

MODEL = "sim-llama"
ROUTERS = ("vllm-router:round_robin", "vllm-router:power_of_two", "vllm-router:cache_aware",
           "sglang-router:cache_aware", "ours:prefix_aware")


# -- the fleet ---------------------------------------------------------------------------------


def start_fleet(count: int, engine_config: Path, time_scale: float) -> list[SimServer]:
    servers = [SimServer(time_scale=time_scale, kv_events=True, args=("--engine-config", str(engine_config)))
               for _ in range(count)]
    for server in servers:
        server.start(wait=False)
    for server in servers:
        server.wait_ready()
    return servers


def restart_fleet(servers: list[SimServer]) -> None:
    """Empty caches and zeroed counters for the next router, on the same addresses."""
    for server in servers:
        server.stop()
    for server in servers:
        server.start(wait=False)
    for server in servers:
        server.wait_ready()


def fleet_counters(servers: list[SimServer]) -> dict[str, np.ndarray]:
    pages = [server.metrics() for server in servers]
    return {name: np.array([metric_value(page, f"vllm:{name}") for page in pages], dtype=float)
            for name in ("prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_total")}


# -- the routers -------------------------------------------------------------------------------


@dataclass
class RunningRouter:
    base_url: str
    stop: Callable[[], None]


def start_binary_router(kind: str, policy: str, servers: list[SimServer], venv: Path) -> RunningRouter:
    port, metrics_port = free_port(), free_port()
    urls = [server.url for server in servers]
    if kind == "vllm-router":
        command = [str(venv / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
                   "--worker-urls", *urls, "--policy", policy, "--log-level", "warning",
                   "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    else:
        command = [str(venv / "bin" / "sglang-router"), "launch", "--host", "127.0.0.1", "--port", str(port),
                   "--worker-urls", *urls, "--policy", policy, "--log-level", "warn",
                   "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    log = tempfile.NamedTemporaryFile(prefix=f"{kind}-", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def stop() -> None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    try:
        wait_until_ready(base + "/v1/models", timeout_s=60)
    except TimeoutError:
        stop()
        raise RuntimeError(f"{kind} did not start; see {log.name}") from None
    return RunningRouter(base, stop)


def our_app_args(servers: list[SimServer], policy: str) -> dict:
    from app.tokenizer import BUILTIN_TOKENIZER_DIR

    return {
        "models": [{
            "name": MODEL,
            "max_model_len": 8192,
            "tokenizer": str(BUILTIN_TOKENIZER_DIR),
            "engine": {"kind": "external",
                       "endpoints": [{"url": s.url, "kv_events": s.kv_events} for s in servers]},
        }],
        "routing": {"policy": policy},
    }


def start_our_gateway(servers: list[SimServer], policy: str, serve_port: int, run: int,
                      direct_port: int | None = None) -> RunningRouter:
    from ray import serve

    from app.config import parse_gateway_config
    from app.deployments.builder import build_gateway

    app = f"ours-{run}"
    args = our_app_args(servers, policy)
    # Direct ingress: the ingress replica's own port, which keeps the route prefix; one application
    # runs at a time, so it takes the root.
    prefix = "/" if direct_port else f"/{app}"
    serve.run(build_gateway(parse_gateway_config(args)), name=app, route_prefix=prefix)
    base = f"http://127.0.0.1:{direct_port}" if direct_port else f"http://127.0.0.1:{serve_port}/{app}"
    wait_until_ready(base + "/v1/models", timeout_s=120)
    handle = serve.get_deployment_handle("ingress", app_name=app)
    if not wait_for(lambda: len(handle.routing_state.remote().result()["replicas"]) == len(servers), timeout_s=60):
        raise RuntimeError("the gateway did not register every server")
    return RunningRouter(base, lambda: serve.delete(app))


# -- the workloads -----------------------------------------------------------------------------


async def run_multi_turn(url: str, sessions: int, turns: int, rate: float, opener_words: int, user_words: int,
                         think_s: float, max_tokens: int, seed: int) -> tuple[list[Sample], float]:
    rng = random.Random(seed)
    starts, t = [], 0.0
    for _ in range(sessions):
        t += rng.expovariate(rate)
        starts.append(t)
    scripts = [[" ".join(rng.choice(WORDS) for _ in range(opener_words if turn == 0 else user_words))
                for turn in range(turns)] for _ in range(sessions)]
    thinks = [[rng.expovariate(1 / think_s) for _ in range(turns)] for _ in range(sessions)]
    samples: list[tuple[float, Sample]] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        began = time.perf_counter()

        async def session(index: int) -> None:
            await asyncio.sleep(starts[index])
            messages: list[dict] = []
            for turn in range(turns):
                messages.append({"role": "user", "content": f"Session {index}: {scripts[index][turn]}"})
                sent = time.perf_counter() - began
                sample, answer = await stream_chat(client, url, messages, max_tokens)
                samples.append((sent, sample))
                if sample.error is not None:
                    return
                messages.append({"role": "assistant", "content": answer})
                await asyncio.sleep(thinks[index][turn])

        await asyncio.gather(*(session(i) for i in range(sessions)))
        wall = time.perf_counter() - began
    return [sample for _, sample in sorted(samples, key=lambda pair: pair[0])], wall


def summarize(router: str, workload: str, samples: list[Sample], wall_s: float, before: dict, after: dict,
              warmup: float) -> dict:
    measured = samples[int(len(samples) * warmup):]
    ok = [s for s in measured if s.error is None and s.ttft_s is not None]
    ttft = np.array([s.ttft_s for s in ok]) if ok else np.array([np.nan])
    e2e = np.array([s.e2e_s for s in ok]) if ok else np.array([np.nan])
    queries = after["prefix_cache_queries_total"] - before["prefix_cache_queries_total"]
    hits = after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"]
    prompt = after["prompt_tokens_total"] - before["prompt_tokens_total"]
    return {
        "router": router, "workload": workload, "requests": len(samples), "measured": len(measured),
        "errors": sum(s.error is not None for s in samples),
        "first_error": next((s.error for s in samples if s.error), None),
        "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p90": float(np.percentile(ttft, 90)),
        "ttft_p99": float(np.percentile(ttft, 99)), "e2e_p50": float(np.percentile(e2e, 50)),
        "output_tok_s": sum(s.output_tokens for s in samples) / wall_s,
        "engine_hit_rate": float(hits.sum() / queries.sum()) if queries.sum() else None,
        "spread_max_over_mean": float(prompt.max() / prompt.mean()) if prompt.mean() else None,
        "wall_s": wall_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers-venv", type=Path, default=Path("/tmp/routers-venv"),
                   help="a virtual environment with vllm-router and sglang-router installed")
    p.add_argument("--routers", default=",".join(ROUTERS), help="kind:policy, comma separated")
    p.add_argument("--workloads", default="shared_prefix,multi_turn")
    p.add_argument("--servers", type=int, default=4)
    p.add_argument("--time-scale", type=float, default=20.0, help="wall seconds per modelled second")
    p.add_argument("--num-blocks", type=int, default=1024, help="KV blocks per server")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--rate", type=float, default=5.0, help="shared-prefix requests per second")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--prompts-per-group", type=int, default=10)
    p.add_argument("--system-words", type=int, default=400)
    p.add_argument("--question-words", type=int, default=40)
    p.add_argument("--sessions", type=int, default=30)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--session-rate", type=float, default=1.0, help="new conversations per second")
    p.add_argument("--opener-words", type=int, default=200)
    p.add_argument("--user-words", type=int, default=40)
    p.add_argument("--think-s", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--direct-ingress", action="store_true",
                   help="ours: clients call the ingress replica's own HTTP server, no Serve proxy (README)")
    p.add_argument("--repeat", type=int, default=1, help="run the list of routers this many times over")
    args = p.parse_args()

    import ray
    from ray import serve

    engine_config = Path(tempfile.mkdtemp()) / "engine.json"
    engine_config.write_text(json.dumps({"num_blocks": args.num_blocks, "max_num_seqs": args.max_num_seqs}))
    servers = start_fleet(args.servers, engine_config, args.time_scale)
    serve_port = free_port()
    direct_port: int | None = None
    if args.direct_ingress:  # before ray.init: Ray's processes read these when they start
        from app.config import ServeConfigFile, direct_ingress_env

        direct_port = free_port()
        file = ServeConfigFile.model_validate({"http_options": {"port": serve_port},
                                               "applications": [{"args": our_app_args(servers, "prefix_aware")}]})
        os.environ.update(direct_ingress_env(file, direct_port))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    rows: list[dict] = []
    try:
        for workload in args.workloads.split(","):
            for run, router in enumerate(args.routers.split(",") * args.repeat):
                kind, policy = router.split(":")
                restart_fleet(servers)
                if kind == "ours":
                    running = start_our_gateway(servers, policy, serve_port, run, direct_port)
                else:
                    running = start_binary_router(kind, policy, servers, args.routers_venv)
                try:
                    before = fleet_counters(servers)
                    url = running.base_url + "/v1/chat/completions"
                    if workload == "shared_prefix":
                        plan: Workload = shared_prefix(args.groups, args.prompts_per_group, args.system_words,
                                                       args.question_words, args.rate, args.seed)
                        samples, wall_s = asyncio.run(run_open_loop(url, plan, args.max_tokens))
                    else:
                        samples, wall_s = asyncio.run(run_multi_turn(
                            url, args.sessions, args.turns, args.session_rate, args.opener_words,
                            args.user_words, args.think_s, args.max_tokens, args.seed))
                    row = summarize(router, workload, samples, wall_s, before, fleet_counters(servers), args.warmup)
                finally:
                    running.stop()
                row.update(servers=args.servers, time_scale=args.time_scale, num_blocks=args.num_blocks,
                           direct_ingress=kind == "ours" and args.direct_ingress,
                           rate=args.rate if workload == "shared_prefix" else args.session_rate)
                rows.append(row)
                print(f"{workload:13s} {router:26s} TTFT p50 {row['ttft_p50']:6.3f}s p90 {row['ttft_p90']:6.3f}s "
                      f"p99 {row['ttft_p99']:6.3f}s  e2e p50 {row['e2e_p50']:6.2f}s  out {row['output_tok_s']:6.1f} "
                      f"tok/s  hit {row['engine_hit_rate'] or 0:.3f}  spread {row['spread_max_over_mean'] or 0:.2f}  "
                      f"errors {row['errors']}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        serve.shutdown()
        ray.shutdown()
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
