"""What one ingress replica carries: added TTFT and CPU per request against offered load.

The gateway (started as the README starts it, `scripts/run-local.sh FILE`) in front of cheap fake
streaming servers (benchmarks/fake_engine.py: 64 tokens 5 ms apart, first after 1 ms), driven by a
cheap open-loop generator (benchmarks/raw_load.py) with ~1,200-token chat prompts, so that the
gateway is what runs out of CPU. At each rate the same load also goes straight to the servers; the
difference of the TTFT p50s is what the gateway adds. CPU is read from /proc for the ingress replica
alone and for every process below `serve run`.

    .venv/bin/python benchmarks/ingress_rate.py --rates 25,50,100,150,200,250,300 --json out.json --plot out.png
    .venv/bin/python benchmarks/ingress_rate.py --ingress-replicas 2 --rates 100,200,300,400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml

from benchmarks import proc_cpu, raw_load
from benchmarks.routers_head_to_head import _registered_servers, _stop_process_tree
from benchmarks.routing_live import shared_prefix
from tests.helpers import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent


def start_fake(count: int, tokens: int, itl_ms: float) -> tuple[subprocess.Popen, list[int]]:
    """`count` fake servers on free ports (they bind them and say which)."""
    process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "fake_engine.py"), "--count", str(count),
                                "--tokens", str(tokens), "--itl-ms", str(itl_ms)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    ports = json.loads(process.stdout.readline())
    for port in ports:
        wait_until_ready(f"http://127.0.0.1:{port}/health", timeout_s=30)
    return process, ports


def start_gateway(ports: list[int], listen_port: int, replicas: int) -> subprocess.Popen:
    from app.tokenizer import BUILTIN_TOKENIZER_DIR

    config = {
        "proxy_location": "Disabled",
        "applications": [{"name": "gateway", "route_prefix": "/", "import_path": "app.deployments.builder:build_app",
                          "args": {
                              "models": [{"name": "sim-llama", "max_model_len": 8192,
                                          "tokenizer": str(BUILTIN_TOKENIZER_DIR),
                                          "engine": {"kind": "external",
                                                     "endpoints": [f"http://127.0.0.1:{p}" for p in ports]}}],
                              "ingress": {"num_replicas": replicas,
                                          "listen": {"host": "127.0.0.1", "port": listen_port}},
                          }}],
    }
    path = Path(tempfile.mkdtemp(prefix="ingress-rate-")) / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = open(path.with_suffix(".log"), "wb")  # kept open for the gateway's lifetime
    process = subprocess.Popen([str(ROOT / "scripts" / "run-local.sh"), str(path)], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{listen_port}"
    wait_until_ready(base + "/v1/models", timeout_s=180)
    deadline = time.monotonic() + 60
    while _registered_servers(base) < len(ports) and time.monotonic() < deadline:
        time.sleep(0.5)
    return process


def bodies(count: int, tokens: int) -> list[bytes]:
    plan = shared_prefix(max(1, count // 16), 16, 400, 40, 1.0, 0)
    return [json.dumps({"model": "sim-llama", "messages": messages, "max_tokens": tokens, "stream": True,
                        "stream_options": {"include_usage": True}}).encode() for messages in plan.prompts[:count]]


def measure(url: str, load: list[bytes], rate: float, duration_s: float, pids: set[int],
            ingress_marker: str, profile: str | None = None) -> dict:
    before = proc_cpu.snapshot()
    spy = None
    if profile:
        ingress = next(pid for pid in proc_cpu.descendants(before, pids)
                       if ingress_marker in before.processes[pid].name)
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(ingress), "--duration", str(int(duration_s * 0.8)),
                                "--rate", "250", "--gil", "--format", "raw", "-o", profile],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = asyncio.run(raw_load.run(url, load, rate, duration_s))
    after = proc_cpu.snapshot()
    if spy is not None:
        spy.wait()
    row = {"rate": rate, **result.summary()}
    if pids:
        ours = proc_cpu.descendants(after, pids) | proc_cpu.descendants(before, pids)
        spent = proc_cpu.cpu_by_process(before, after, ours)
        ingress = sum(s for pid, s in spent.items() if ingress_marker in after.processes[pid].name)
        done = max(1, row["completed"])
        row.update(ingress_cpu_ms_per_request=1000 * ingress / done, ingress_cpu_share=ingress / result.wall_s,
                   gateway_cpu_ms_per_request=1000 * sum(spent.values()) / done)
    row["machine_busy"] = proc_cpu.machine_busy(before, after)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="25,50,100,150,200,250,300")
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--servers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--itl-ms", type=float, default=5.0)
    p.add_argument("--ingress-replicas", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--plot", help="write a PNG of added TTFT and ingress CPU against the offered rate")
    p.add_argument("--py-spy", metavar="DIR",
                   help="profile the ingress replica at each rate with py-spy (on PATH): DIR/ingress-RATE.txt")
    args = p.parse_args()

    fake, ports = start_fake(args.servers, args.tokens, args.itl_ms)
    listen_port = free_port()
    gateway = None
    rows: list[dict] = []
    try:
        gateway = start_gateway(ports, listen_port, args.ingress_replicas)
        load = bodies(256, args.tokens)
        gateway_url = f"http://127.0.0.1:{listen_port}/v1/chat/completions"
        asyncio.run(raw_load.run(gateway_url, load, 20, 5))  # warm up: connections, the TTFT model
        for rate in [float(r) for r in args.rates.split(",")]:
            direct = measure(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", load, rate, args.duration_s,
                             set(), "")
            profile = f"{args.py_spy}/ingress-{rate:g}.txt" if args.py_spy else None
            ours = measure(gateway_url, load, rate, args.duration_s, {gateway.pid}, "ServeReplica:gateway:ingress",
                           profile)
            row = {"rate": rate, "ingress_replicas": args.ingress_replicas, "direct": direct, "gateway": ours,
                   "added_ttft_p50_ms": ours["ttft_p50_ms"] - direct["ttft_p50_ms"],
                   "added_ttft_p90_ms": ours["ttft_p90_ms"] - direct["ttft_p90_ms"]}
            rows.append(row)
            print(f"rate {rate:5.0f}/s  done {ours['completed_per_s']:6.1f}/s  errors {ours['errors']}  "
                  f"TTFT p50 direct {direct['ttft_p50_ms']:6.2f} ms gateway {ours['ttft_p50_ms']:7.2f} ms "
                  f"(added {row['added_ttft_p50_ms']:6.2f}, p90 added {row['added_ttft_p90_ms']:6.2f})  "
                  f"ingress CPU {ours['ingress_cpu_ms_per_request']:5.2f} ms/req "
                  f"({100 * ours['ingress_cpu_share']:3.0f}% of a core)  "
                  f"all of ours {ours['gateway_cpu_ms_per_request']:5.2f} ms/req  "
                  f"busy {100 * ours['machine_busy']:3.0f}%", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        if gateway is not None:
            _stop_process_tree(gateway, 60, interrupt=True)
        fake.terminate()
        fake.wait()
    if args.plot and rows:
        plot(rows, args.plot)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate"] for r in rows]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(rates, [r["added_ttft_p50_ms"] for r in rows], "o-", label="added TTFT p50")
    left.plot(rates, [r["added_ttft_p90_ms"] for r in rows], "s--", label="added TTFT p90")
    left.axhline(10, color="grey", linewidth=0.8, linestyle=":")
    left.set_xlabel("offered streamed requests/s (64 tokens, ~1,200-token prompts)")
    left.set_ylabel("TTFT added by the gateway (ms)")
    right = left.twinx()
    right.plot(rates, [100 * r["gateway"]["ingress_cpu_share"] for r in rows], "^:", color="tab:red",
               label="ingress replica CPU (% of a core)")
    right.set_ylabel("ingress replica CPU (% of one core)")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, labels, loc="upper left", fontsize=8)
    left.set_title(f"One ingress replica ({rows[0]['ingress_replicas']} in all), 2-core machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
