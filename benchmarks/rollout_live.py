"""A rollout and a rollback under load, live through Ray Serve on simulated engines: TTFT and errors
over time while the traffic split's weights move, as a PNG and JSON.

    .venv/bin/python benchmarks/rollout_live.py --rate 20 --step-s 8 --out benchmarks/rollout.png

Two models (v1, v2) on 2 simulated replicas each, 2 ingress replicas, a split `llama-prod` over them.
Open-loop Poisson arrivals of streaming chats (64 tokens); every `--step-s` seconds the weights move
0 -> 10 -> 50 -> 100 -> 0 (a rollback) through `set_traffic` on the app's handle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx
from ray import serve

from app.config import parse_gateway_config
from app.deployments.builder import build_gateway
from tests.helpers import listen_on_free_port, start_local_serve, stop_local_serve, wait_for

STEPS = (10, 50, 100, 0)  # the split starts at 0; the last step is the rollback


def split(v2: int) -> dict:
    return {"llama-prod": {"targets": [{"target": "llama-v1", "weight": 100 - v2},
                                       {"target": "llama-v2", "weight": v2}]}}


async def one(http: httpx.AsyncClient, url: str, began: float, max_tokens: int, rows: list[dict]) -> None:
    body = {"model": "llama-prod", "messages": [{"role": "user", "content": f"hello {random.random()}"}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    ttft, status, target, complete = None, 0, None, False
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            status, target = response.status_code, response.headers.get("x-gateway-target")
            async for line in response.aiter_lines():
                if ttft is None and line.startswith("data: {") and '"content"' in line:
                    ttft = time.monotonic() - began
                if line == "data: [DONE]":
                    complete = True
    except httpx.HTTPError:
        status = -1
    rows.append({"t": began, "ttft": ttft, "status": status, "target": target,
                 "ok": status == 200 and complete})


async def load(url: str, rate: float, duration: float, max_tokens: int, rows: list[dict]) -> None:
    rng = random.Random(0)
    tasks = []
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as http:
        start = time.monotonic()
        while time.monotonic() - start < duration:
            tasks.append(asyncio.create_task(one(http, url, time.monotonic(), max_tokens, rows)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)


async def steps(handle, step_s: float, marks: list[tuple[float, int]]) -> None:
    for v2 in STEPS:
        await asyncio.sleep(step_s)
        await asyncio.to_thread(lambda v2=v2: handle.set_traffic.remote(split(v2)).result(timeout_s=10))
        marks.append((time.monotonic(), v2))


def plot(rows: list[dict], marks: list[tuple[float, int]], start: float, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for target, color in (("llama-v1", "tab:blue"), ("llama-v2", "tab:orange")):
        points = [(r["t"] - start, r["ttft"]) for r in rows if r["target"] == target and r["ttft"] is not None]
        top.scatter([p[0] for p in points], [p[1] * 1000 for p in points], s=6, color=color, label=target)
    failed = [r["t"] - start for r in rows if not r["ok"]]
    top.scatter(failed, [0] * len(failed), marker="x", color="red", label=f"failed ({len(failed)})")
    top.set_ylabel("TTFT (ms)")
    top.legend(loc="upper right")
    bins = [i * 1.0 for i in range(int(max(r["t"] - start for r in rows)) + 2)]
    for target, color in (("llama-v1", "tab:blue"), ("llama-v2", "tab:orange")):
        bottom.hist([r["t"] - start for r in rows if r["target"] == target], bins=bins, color=color, alpha=0.6,
                    label=target)
    for at, v2 in marks:
        for axis in (top, bottom):
            axis.axvline(at - start, color="grey", linestyle="--", linewidth=0.8)
        bottom.text(at - start, bottom.get_ylim()[1] * 0.9, f" v2 {v2}%", fontsize=8)
    bottom.set_ylabel("requests per second")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    fig.suptitle("Rollout 0 -> 10 -> 50 -> 100 % and rollback, live through Serve (simulated engines)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=20.0, help="requests per second")
    p.add_argument("--step-s", type=float, default=8.0, help="seconds between weight changes")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-scale", type=float, default=0.2)
    p.add_argument("--out", default="benchmarks/rollout.png")
    p.add_argument("--json", default="benchmarks/results/rollout_live.json")
    a = p.parse_args()
    start_local_serve()
    try:
        engine = {"time_scale": a.time_scale}
        args = {"models": [{"name": name, "engine": engine, "deployment": {"num_replicas": 2}}
                           for name in ("llama-v1", "llama-v2")],
                "traffic": split(0), "ingress": {"num_replicas": 2}}
        url = listen_on_free_port(args)
        serve.run(build_gateway(parse_gateway_config(args)), name="rollout", route_prefix="/rollout")
        handle = serve.get_app_handle("rollout")
        assert wait_for(lambda: len(handle.routing_state.remote().result(timeout_s=10)["replicas"]) == 4,
                        timeout_s=60)
        rows: list[dict] = []
        marks: list[tuple[float, int]] = []
        duration = a.step_s * (len(STEPS) + 1)
        start = time.monotonic()

        async def run() -> None:
            await asyncio.gather(load(url, a.rate, duration, a.max_tokens, rows), steps(handle, a.step_s, marks))

        asyncio.run(run())
        failed = sum(not r["ok"] for r in rows)
        print(f"{len(rows)} requests, {failed} failed; weight changes at "
              f"{', '.join(f'{at - start:.1f}s->{v2}%' for at, v2 in marks)}")
        for (at, v2), nxt in zip(marks, [*marks[1:], (float('inf'), None)], strict=True):
            window = [r for r in rows if at + 0.5 < r["t"] < nxt[0]]
            share = sum(r["target"] == "llama-v2" for r in window) / max(1, len(window))
            ttfts = sorted(r["ttft"] for r in window if r["ttft"] is not None)
            p90 = ttfts[int(0.9 * (len(ttfts) - 1))] * 1000 if ttfts else float("nan")
            print(f"  v2 at {v2:3d}%: {len(window)} requests, {share:.1%} served by v2, TTFT p90 {p90:.1f} ms")
        with open(a.json, "w") as f:
            json.dump({"rows": [{**r, "t": r["t"] - start} for r in rows],
                       "marks": [(at - start, v2) for at, v2 in marks]}, f)
        plot(rows, marks, start, a.out)
    finally:
        stop_local_serve()


if __name__ == "__main__":
    main()
