"""What the gateway's control traffic costs (scraping servers' /metrics, reports to the state actor, the
routers' syncs), idle and under load, at a given number of external servers.

The servers are cheap fakes (benchmarks/fake_engine.py, all ports in one process), so 64 of them fit a
2-core machine; they publish no KV events (see routers_head_to_head.py for a fleet that does). The
gateway is started as the README starts it. Reported per process over each window: CPU seconds and
share of a core, for the gateway's own processes (ingress, endpoint watcher, state actor) and Ray's.

    .venv/bin/python benchmarks/control_plane.py --servers 8,64 --idle-s 30 --load-rate 50 --load-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import proc_cpu, raw_load
from benchmarks.ingress_rate import bodies, start_fake, start_gateway
from benchmarks.routers_head_to_head import _stop_process_tree
from tests.helpers import free_port

OURS = {"ServeReplica:gateway:ingress": "ingress", "ServeReplica:gateway:endpoints": "endpoint watcher",
        "ClusterStateActor": "state actor"}


def window(pids: set[int], seconds: float, load: tuple[str, list[bytes], float] | None) -> dict:
    before = proc_cpu.snapshot()
    requests = 0
    if load is None:
        time.sleep(seconds)
    else:
        url, payloads, rate = load
        result = asyncio.run(raw_load.run(url, payloads, rate, seconds))
        requests = len(result.e2e_s)
    after = proc_cpu.snapshot()
    wall = after.total_s - before.total_s  # all cores' clock time; divided by the core count below
    elapsed = wall / os.cpu_count() if os.cpu_count() else seconds
    tree = proc_cpu.descendants(after, pids) | proc_cpu.descendants(before, pids)
    spent = proc_cpu.cpu_by_process(before, after, tree)
    groups: dict[str, float] = {}
    for pid, seconds_spent in spent.items():
        name = after.processes[pid].name
        label = next((label for marker, label in OURS.items() if marker in name), "ray and serve run")
        groups[label] = groups.get(label, 0.0) + seconds_spent
    return {"elapsed_s": elapsed, "requests": requests,
            "cpu_s": groups, "share_of_a_core": {k: v / elapsed for k, v in groups.items()},
            "gateway_share": sum(v for k, v in groups.items() if k in OURS.values()) / elapsed,
            "all_share": sum(groups.values()) / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="8,64", help="fleet sizes, comma separated")
    p.add_argument("--idle-s", type=float, default=30.0)
    p.add_argument("--load-rate", type=float, default=50.0, help="streamed requests/s during the load window")
    p.add_argument("--load-s", type=float, default=30.0)
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for count in [int(n) for n in args.servers.split(",")]:
        fake, ports = start_fake(count, 64, 5.0)
        listen = free_port()
        gateway = None
        try:
            gateway = start_gateway(ports, listen, 1)
            time.sleep(10)  # past start-up
            idle = window({gateway.pid}, args.idle_s, None)
            url = f"http://127.0.0.1:{listen}/v1/chat/completions"
            loaded = window({gateway.pid}, args.load_s, (url, bodies(256, 64), args.load_rate))
        finally:
            if gateway is not None:
                _stop_process_tree(gateway, 60, interrupt=True)
            fake.terminate()
            fake.wait()
        for name, measured in (("idle", idle), (f"{args.load_rate:g} req/s", loaded)):
            row = {"servers": count, "window": name, **measured}
            rows.append(row)
            shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(measured["share_of_a_core"].items()))
            print(f"{count:3d} servers, {name:10s}: gateway's own processes {100 * measured['gateway_share']:5.1f}% "
                  f"of a core, with Ray's {100 * measured['all_share']:5.1f}%  ({shares})", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
