"""Scheduling decision latency and prefix-index memory at fleet scale.

Builds the router's cluster state for N replicas whose caches are full (each engine's whole KV
capacity indexed, prefixes shared between replicas as affinity routing leaves them), then times
`Scheduler.schedule` on prompts that hit a cached prefix, half-hit, or miss entirely.

    .venv/bin/python benchmarks/scheduler_latency.py --replicas 128 --prompt-blocks 256
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

from app.router.scheduler import RoutingConfig, RoutingRequest, Scheduler
from app.router.state import ClusterState, ReplicaInfo, ReplicaStats

BLOCK = 16


def build_state(replicas: int, num_blocks: int, prompt_blocks: int, copies: int, rng: random.Random,
                speculative: bool) -> tuple[ClusterState, list[list[int]]]:
    """Fill every replica's cache with whole prompts; each prompt is held by `copies` replicas."""
    state = ClusterState(stale_after_s=1e9)
    ids = [f"replica-{i:04d}" for i in range(replicas)]
    for rid in ids:
        state.register(ReplicaInfo(replica_id=rid, model="m", block_size=BLOCK, num_gpu_blocks=num_blocks))
        state.update_stats(rid, ReplicaStats(num_requests_running=rng.randrange(0, 48),
                                             num_requests_waiting=rng.randrange(0, 8),
                                             kv_cache_usage_perc=rng.random()), 0.0)
    prompts_per_replica = num_blocks // prompt_blocks
    num_prompts = replicas * prompts_per_replica // copies
    prompts = [[rng.getrandbits(64) for _ in range(prompt_blocks)] for _ in range(num_prompts)]
    for p, hashes in enumerate(prompts):
        for c in range(copies):
            state.index.add(ids[(p * copies + c) % replicas], hashes)
    if speculative:
        # Requests routed in the last TTL, not yet confirmed by KV events.
        for p in range(0, num_prompts, 8):
            state.note_routed(ids[p % replicas], prompts[p], 0.0)
    state.synced_at = 0.0
    return state, prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=128)
    p.add_argument("--prompt-blocks", type=int, default=256, help="blocks per prompt (16 tokens each)")
    p.add_argument("--num-blocks", type=int, default=16384, help="each engine's KV capacity in blocks")
    p.add_argument("--copies", type=int, default=2, help="replicas holding each cached prompt")
    p.add_argument("--decisions", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    a = p.parse_args()
    rng = random.Random(a.seed)
    t0 = time.perf_counter()
    state, prompts = build_state(a.replicas, a.num_blocks, a.prompt_blocks, a.copies, rng, speculative=True)
    build_s = time.perf_counter() - t0
    scheduler = Scheduler(state, RoutingConfig())
    requests = []
    for i in range(a.decisions):
        kind = i % 3
        if kind == 0:  # full hit
            hashes = rng.choice(prompts)
        elif kind == 1:  # shared prefix, new question
            base = rng.choice(prompts)
            hashes = base[: a.prompt_blocks // 2] + [rng.getrandbits(64) for _ in range(a.prompt_blocks // 2)]
        else:  # unseen prompt
            hashes = [rng.getrandbits(64) for _ in range(a.prompt_blocks)]
        requests.append(RoutingRequest("m", hashes, len(hashes) * BLOCK, BLOCK))
    for r in requests[:200]:  # warm caches and numpy paths
        scheduler.schedule(r, 1.0)
    times = np.empty(len(requests))
    for i, r in enumerate(requests):
        t = time.perf_counter()
        scheduler.schedule(r, 1.0)
        times[i] = time.perf_counter() - t
    index = state.index
    result = {
        "replicas": a.replicas, "prompt_blocks": a.prompt_blocks, "num_blocks": a.num_blocks,
        "entries": index.entries(), "distinct_blocks": index.num_keys,
        "index_bytes": index.nbytes(), "bytes_per_entry": index.nbytes() / index.entries(),
        "bytes_per_block": index.nbytes() / index.num_keys,
        "decision_p50_us": float(np.percentile(times, 50) * 1e6),
        "decision_p99_us": float(np.percentile(times, 99) * 1e6),
        "decision_max_us": float(times.max() * 1e6), "build_s": build_s,
    }
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
