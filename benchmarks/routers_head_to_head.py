"""Our gateway against the other open routers, on the same fleet of standalone simulated vLLM servers.

Each router is put in front of the same N servers (`python -m app.engines.simulated`, real processes
with vLLM's API, /metrics and ZMQ KV events), restarted before every run so each starts from empty
caches, and driven by the same request sequence:

- shared-prefix: `--groups` long system prompts, each with `--prompts-per-group` different
  questions, arriving as a Poisson process at `--rate` requests/s;
- multi-turn chat: `--sessions` conversations of `--turns` turns each, starting as a Poisson process;
  each turn resends the whole conversation so far (the previous answers included) after a think time.

Routers (`--routers`, kind:policy[:path], comma separated):
- `none:round_robin`: no router, the client spreads requests over the servers itself;
- `vllm-router:<policy>` (round_robin, power_of_two, cache_aware), `sglang-router:cache_aware`, from
  PyPI into their own virtual environment (`--routers-venv`):
      python3 -m venv /tmp/routers-venv && /tmp/routers-venv/bin/pip install vllm-router==0.1.17 sglang-router==0.3.2
- `ours:<policy>[:<path>]`: the gateway started as a user starts it, `scripts/run-local.sh FILE` (that
  is `serve run`), on a config of engine kind external over the same servers (with their KV events),
  policy prefix_aware, round_robin or power_of_two. `<path>` is how clients reach it:
  `listen` (the gateway's own listener in its ingress replicas, the default) or `proxy` (Serve's HTTP
  proxy in front); default `--ours-path`.

The issue-16 shape (8 servers slowed six-fold, ~1,200-token prompts, 64 streamed tokens, 20 and 32/s):

    .venv/bin/python benchmarks/routers_head_to_head.py --workloads shared_prefix --servers 8 --time-scale 6 \\
        --groups 64 --prompts-per-group 16 --max-tokens 64 --rate 20 --json results.json

Reported per router and workload: TTFT p50/p90/p99 and end-to-end p50 (client side, after the first
`--warmup` share of requests), completed requests/s and output tokens/s over the whole run, the
prefix-cache hit rate the servers report (vllm:prefix_cache_hits / queries), the spread of prompt
tokens over the servers (most over mean), errors, and CPU: every process of the router (for ours,
every process below `serve run`: proxy, ingress, watcher, state actor, controller, GCS, raylet,
dashboard), per request, with a per-process breakdown in the JSON; the servers' and the load
generator's CPU; and how busy the whole machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx
import numpy as np
import yaml

from benchmarks import proc_cpu
from benchmarks.routing_live import WORDS, Workload, shared_prefix
from benchmarks.sse_load import Sample, new_session, stream_chat
from tests.helpers import SimServer, free_port, metric_value, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sim-llama"
ROUTERS = ("none:round_robin", "vllm-router:cache_aware", "sglang-router:cache_aware", "ours:prefix_aware")


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
    urls: list[str]
    """Where clients send requests: one base URL, or (no router) every server's, used in turn."""
    stop: Callable[[], None]
    pids: set[int] = field(default_factory=set)
    """The router's own processes (their descendants are counted too)."""


def _stop_process_tree(process: subprocess.Popen, grace_s: float, *, interrupt: bool = False) -> None:
    """Stop a process we started and everything below it, by PID."""
    tree = proc_cpu.descendants(proc_cpu.snapshot(), {process.pid})
    if process.poll() is None:
        process.send_signal(signal.SIGINT if interrupt else signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in tree - {process.pid}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
        _stop_process_tree(process, 20)

    try:
        wait_until_ready(base + "/v1/models", timeout_s=60)
    except TimeoutError:
        stop()
        raise RuntimeError(f"{kind} did not start; see {log.name}") from None
    return RunningRouter([base], stop, {process.pid})


OURS_SETTINGS: list[tuple[str, object]] = []
"""--ours-set PATH=JSON: settings of ours' application args, e.g. cluster_state.sync_interval_s=0.2."""


def _apply_settings(args: dict, settings: list[tuple[str, object]]) -> dict:
    for path, value in settings:
        target = args
        *parents, leaf = path.split(".")
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
        target[leaf] = value
    return args


def our_app_args(servers: list[SimServer], policy: str, *, tokenizer: bool) -> dict:
    from app.tokenizer import BUILTIN_TOKENIZER_DIR

    model: dict = {
        "name": MODEL,
        "max_model_len": 8192,
        "engine": {"kind": "external", "endpoints": [{"url": s.url, "kv_events": s.kv_events} for s in servers]},
    }
    if tokenizer:
        model["tokenizer"] = str(BUILTIN_TOKENIZER_DIR)
    return _apply_settings({"models": [model], "routing": {"policy": policy}}, OURS_SETTINGS)


def our_config_file(servers: list[SimServer], policy: str, port: int, path: str, *, tokenizer: bool,
                    legacy: bool = False) -> Path:
    """The gateway's own listener on `port` (path `listen`, the default), or Serve's proxy there (`proxy`).
    `legacy`: an older checkout of the gateway (no `ingress.listen` key), through Serve's proxy."""
    args = our_app_args(servers, policy, tokenizer=tokenizer)
    if legacy:
        serve: dict = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": port}}
    elif path == "listen":
        args["ingress"] = {"listen": {"host": "127.0.0.1", "port": port}}
        serve = {"proxy_location": "Disabled"}
    elif path == "proxy":
        args["ingress"] = {"listen": None}
        serve = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": port}}
    else:
        raise ValueError(f"unknown path {path!r} for ours: listen or proxy")
    config = {
        **serve,
        "applications": [{"name": "gateway", "route_prefix": "/", "import_path": "app.deployments.builder:build_app",
                          "args": args}],
    }
    path = Path(tempfile.mkdtemp(prefix="ours-")) / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _registered_servers(base: str) -> int:
    try:
        page = httpx.get(base + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0
    return sum(1 for line in page.splitlines()
               if line.startswith("gateway_replica_load{") and 'signal="inflight"' in line)


def start_our_gateway(servers: list[SimServer], policy: str, path: str, *, tokenizer: bool,
                      root: Path = ROOT) -> RunningRouter:
    """`scripts/run-local.sh FILE`, exactly as the README starts the gateway (from `root`: another checkout
    of it, with this one's .venv linked in, for before-and-after runs)."""
    port = free_port()
    legacy = root.resolve() != ROOT
    config = our_config_file(servers, policy, port, path, tokenizer=tokenizer, legacy=legacy)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    if legacy:
        env["PYTHONPATH"] = str(root)  # ahead of this checkout's editable install, in every Ray worker too
    log = open(config.with_suffix(".log"), "wb")  # kept open for the run's lifetime
    process = subprocess.Popen([str(root / "scripts" / "run-local.sh"), str(config)], cwd=root, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def stop() -> None:
        _stop_process_tree(process, 60, interrupt=True)  # Ctrl-C: serve run shuts Serve and Ray down
        log.close()

    try:
        wait_until_ready(base + "/v1/models", timeout_s=180)
        deadline = time.monotonic() + 120
        while _registered_servers(base) < len(servers):
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not register every server")
            time.sleep(0.5)
    except TimeoutError as error:
        stop()
        raise RuntimeError(f"ours did not start ({error}); see {log.name}") from None
    return RunningRouter([base], stop, {process.pid})


def start_router(spec: str, servers: list[SimServer], args: argparse.Namespace) -> RunningRouter:
    kind, policy, *rest = spec.split(":")
    if kind == "none":
        return RunningRouter([server.url for server in servers], lambda: None)
    if kind == "ours":
        return start_our_gateway(servers, policy, rest[0] if rest else args.ours_path,
                                 tokenizer=not args.ours_approximate, root=args.ours_root)
    return start_binary_router(kind, policy, servers, args.routers_venv)


# -- the workloads -----------------------------------------------------------------------------


def chat_body(messages: list[dict], max_tokens: int) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def run_open_loop(urls: list[str], workload: Workload, max_tokens: int) -> tuple[list[Sample], float]:
    async with new_session() as session:
        started = time.perf_counter()

        async def at(index: int, offset: float, messages: list[dict]) -> Sample:
            await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
            url = urls[index % len(urls)] + "/v1/chat/completions"
            return (await stream_chat(session, url, chat_body(messages, max_tokens)))[0]

        samples = await asyncio.gather(*(
            at(i, t, m) for i, (t, m) in enumerate(zip(workload.arrivals, workload.prompts, strict=True))))
        return list(samples), time.perf_counter() - started


async def run_multi_turn(urls: list[str], sessions: int, turns: int, rate: float, opener_words: int,
                         user_words: int, think_s: float, max_tokens: int, seed: int) -> tuple[list[Sample], float]:
    rng = random.Random(seed)
    starts, t = [], 0.0
    for _ in range(sessions):
        t += rng.expovariate(rate)
        starts.append(t)
    scripts = [[" ".join(rng.choice(WORDS) for _ in range(opener_words if turn == 0 else user_words))
                for turn in range(turns)] for _ in range(sessions)]
    thinks = [[rng.expovariate(1 / think_s) for _ in range(turns)] for _ in range(sessions)]
    samples: list[tuple[float, Sample]] = []
    async with new_session() as client:
        began = time.perf_counter()

        async def session(index: int) -> None:
            await asyncio.sleep(starts[index])
            messages: list[dict] = []
            url = urls[index % len(urls)] + "/v1/chat/completions"  # no router: a conversation stays put
            for turn in range(turns):
                messages.append({"role": "user", "content": f"Session {index}: {scripts[index][turn]}"})
                sent = time.perf_counter() - began
                sample, answer = await stream_chat(client, url, chat_body(messages, max_tokens), want_text=True)
                samples.append((sent, sample))
                if sample.error is not None:
                    return
                messages.append({"role": "assistant", "content": answer})
                await asyncio.sleep(thinks[index][turn])

        await asyncio.gather(*(session(i) for i in range(sessions)))
        wall = time.perf_counter() - began
    return [sample for _, sample in sorted(samples, key=lambda pair: pair[0])], wall


# -- the report --------------------------------------------------------------------------------


def start_profiles(folder: str, router: str, running: RunningRouter, snap: proc_cpu.Snapshot,
                   args: argparse.Namespace) -> list[subprocess.Popen]:
    """py-spy on ours' ingress replica and Serve proxy for most of the load (a shared-prefix run lasts
    about groups x prompts / rate seconds)."""
    duration = max(5, int(0.7 * args.groups * args.prompts_per_group / args.rate))
    spies = []
    for pid in proc_cpu.descendants(snap, running.pids):
        name = snap.processes[pid].name
        for marker, label in (("ServeReplica:gateway:ingress", "ingress"), ("ProxyActor", "proxy"),
                              ("ClusterStateActor", "state-actor"), ("ServeReplica:gateway:endpoints", "watcher")):
            if name.startswith("ray::") and marker in name:
                out = Path(folder) / f"{router.replace(':', '-')}-{label}-{pid}.txt"
                spies.append(subprocess.Popen(
                    ["py-spy", "record", "--pid", str(pid), "--duration", str(duration), "--rate", "200", "--gil",
                     "--format", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def cpu_report(before: proc_cpu.Snapshot, after: proc_cpu.Snapshot, router: RunningRouter,
               servers: list[SimServer], requests: int) -> dict:
    ours = proc_cpu.descendants(after, router.pids) | proc_cpu.descendants(before, router.pids)
    spent = proc_cpu.cpu_by_process(before, after, ours)
    by_label: dict[str, float] = {}
    for pid, seconds in spent.items():
        name = proc_cpu.label(after.processes[pid])
        by_label[name] = by_label.get(name, 0.0) + seconds
    server_pids = proc_cpu.descendants(after, {s.process.pid for s in servers if s.process is not None})
    router_s = sum(spent.values())
    return {
        "router_cpu_s": router_s,
        "router_cpu_ms_per_request": 1000 * router_s / max(1, requests),
        "router_cpu_by_process": dict(sorted(by_label.items(), key=lambda kv: -kv[1])),
        "servers_cpu_s": sum(proc_cpu.cpu_by_process(before, after, server_pids).values()),
        "loadgen_cpu_s": sum(proc_cpu.cpu_by_process(before, after, {os.getpid()}).values()),
        "machine_busy": proc_cpu.machine_busy(before, after),
    }


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
        "completed_per_s": sum(s.error is None for s in samples) / wall_s,
        "output_tok_s": sum(s.output_tokens for s in samples) / wall_s,
        "engine_hit_rate": float(hits.sum() / queries.sum()) if queries.sum() else None,
        "spread_max_over_mean": float(prompt.max() / prompt.mean()) if prompt.mean() else None,
        "spread_max_over_min": float(prompt.max() / prompt.min()) if prompt.min() else None,
        "wall_s": wall_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers-venv", type=Path, default=Path("/tmp/routers-venv"),
                   help="a virtual environment with vllm-router and sglang-router installed")
    p.add_argument("--routers", default=",".join(ROUTERS), help="kind:policy[:path], comma separated")
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
    p.add_argument("--max-tokens", type=int, default=16, help="streamed output tokens per request")
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--ours-path", default="listen", choices=("listen", "proxy"),
                   help="how clients reach ours when the router spec does not say")
    p.add_argument("--ours-approximate", action="store_true",
                   help="ours without the model's tokenizer: approximate text keys, the servers tokenize")
    p.add_argument("--repeat", type=int, default=1, help="run the list of routers this many times over")
    p.add_argument("--ours-set", action="append", default=[], metavar="PATH=JSON",
                   help="a setting of ours' application args, e.g. models.0.engine.scrape_interval_s=0.5")
    p.add_argument("--ours-root", type=Path, default=ROOT,
                   help="ours from another checkout (e.g. a git worktree of an older commit, with .venv linked)")
    p.add_argument("--py-spy", metavar="DIR", help="profile ours' ingress (and Serve's proxy, if running) during "
                   "the load with py-spy (on PATH): DIR/<router>-<process>.txt, raw stacks holding the GIL; also the "
                   "state actor and the endpoint watcher")
    args = p.parse_args()
    for setting in args.ours_set:
        key, _, value = setting.partition("=")
        OURS_SETTINGS.append((key, json.loads(value)))

    engine_config = Path(tempfile.mkdtemp()) / "engine.json"
    engine_config.write_text(json.dumps({"num_blocks": args.num_blocks, "max_num_seqs": args.max_num_seqs}))
    servers = start_fleet(args.servers, engine_config, args.time_scale)
    rows: list[dict] = []
    try:
        for workload in args.workloads.split(","):
            for router in args.routers.split(",") * args.repeat:
                restart_fleet(servers)
                running = start_router(router, servers, args)
                try:
                    before = fleet_counters(servers)
                    cpu_before = proc_cpu.snapshot()
                    spies = start_profiles(args.py_spy, router, running, cpu_before, args) if args.py_spy else []
                    if workload == "shared_prefix":
                        plan = shared_prefix(args.groups, args.prompts_per_group, args.system_words,
                                             args.question_words, args.rate, args.seed)
                        samples, wall_s = asyncio.run(run_open_loop(running.urls, plan, args.max_tokens))
                    else:
                        samples, wall_s = asyncio.run(run_multi_turn(
                            running.urls, args.sessions, args.turns, args.session_rate, args.opener_words,
                            args.user_words, args.think_s, args.max_tokens, args.seed))
                    cpu_after = proc_cpu.snapshot()
                    for spy in spies:
                        spy.wait()
                    row = summarize(router, workload, samples, wall_s, before, fleet_counters(servers), args.warmup)
                    row.update(cpu_report(cpu_before, cpu_after, running, servers, len(samples)))
                finally:
                    running.stop()
                row.update(servers=args.servers, time_scale=args.time_scale, num_blocks=args.num_blocks,
                           max_tokens=args.max_tokens, ours_approximate=args.ours_approximate,
                           rate=args.rate if workload == "shared_prefix" else args.session_rate)
                rows.append(row)
                print(f"{workload:13s} {router:26s} TTFT p50 {row['ttft_p50']:6.3f}s p90 {row['ttft_p90']:6.3f}s "
                      f"p99 {row['ttft_p99']:6.3f}s  e2e p50 {row['e2e_p50']:6.2f}s  "
                      f"done {row['completed_per_s']:5.1f}/s  out {row['output_tok_s']:6.1f} tok/s  "
                      f"hit {row['engine_hit_rate'] or 0:.3f}  spread {row['spread_max_over_mean'] or 0:.2f}  "
                      f"errors {row['errors']}  router CPU {row['router_cpu_ms_per_request']:5.1f} ms/req  "
                      f"busy {100 * row['machine_busy']:3.0f}%", flush=True)
                top = list(row["router_cpu_by_process"].items())[:6]
                if top:
                    print("    " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in top), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
