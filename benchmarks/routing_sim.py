"""Discrete-event simulation of routing policies on a fleet of simulated vLLM engines, in virtual time.

The real scheduler code (app/router) routes; the real simulated engine core (app/engines/simulated)
serves; KV events and stats reach the router after a report delay, as they do live. Every policy sees
the same request sequence on an identical fleet.

    .venv/bin/python benchmarks/routing_sim.py --replicas 8 --rates 20,40,60 --requests 2000
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import time
from dataclasses import dataclass, field

import numpy as np

from app.engines.protocol import EngineRequest, SamplingParams
from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.core import SimulatedEngineCore
from app.router.hashing import get_hasher
from app.router.scheduler import RoutingConfig, RoutingRequest, Scheduler
from app.router.state import ClusterState, ReplicaInfo, ReplicaStats

BLOCK = 16


@dataclass
class Req:
    arrival: float
    tokens: list[int]
    output_len: int
    hashes: list[int] = field(default_factory=list)


def shared_prefix(groups: int, per_group: int, system_len: int, question_len: int, output_len: int,
                  rate: float, seed: int) -> list[Req]:
    rng = random.Random(seed)
    systems = [[rng.randrange(10, 1000) for _ in range(system_len)] for _ in range(groups)]
    order = [g for g in range(groups) for _ in range(per_group)]
    rng.shuffle(order)
    t, out = 0.0, []
    hasher = get_hasher()
    for g in order:
        t += rng.expovariate(rate)
        tokens = systems[g] + [rng.randrange(10, 1000) for _ in range(question_len)]
        out.append(Req(t, tokens, output_len, hasher.block_hashes(tokens, BLOCK)))
    return out


def upper_bound_hit_rate(reqs: list[Req]) -> float:
    seen: set[int] = set()
    hits = total = 0
    for r in reqs:
        usable = (len(r.tokens) - 1) // BLOCK
        n = 0
        for h in r.hashes[:usable]:
            if h not in seen:
                break
            n += 1
        hits += n * BLOCK
        total += len(r.tokens)
        seen.update(r.hashes)
    return hits / total


class RayPrefixAffinity:
    """Ray's PrefixCacheAffinityRouter decision, driven with Ray's own PrefixTree (defaults:
    imbalanced_threshold=inf, match_rate_threshold=0.1), then Serve's pick: shortest queue in the group."""

    def __init__(self, replica_ids: list[str], seed: int) -> None:
        from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree

        self.tree = PrefixTree()
        self.tree.add_tenants(replica_ids, 0.0)
        self.ids = replica_ids
        self.rng = random.Random(seed)

    def choose(self, req: Req, load: dict[str, int], now: float) -> str:
        text = "".join(chr(0x100 + t) for t in req.tokens)
        matched, tenants = self.tree.prefix_match(text, self.ids)
        if len(matched) / len(text) < 0.1:
            tenants = self.tree.get_smallest_tenants() or []
        group = tenants or self.rng.sample(self.ids, 2)
        choice = min(group, key=lambda r: (load[r], self.rng.random()))
        self.tree.insert(text, choice, now)
        return choice


def simulate(policy: str, reqs: list[Req], replicas: int, engine: SimulatedEngineConfig, seed: int,
             report_interval: float = 0.1) -> dict:
    ids = [f"r{i:03d}" for i in range(replicas)]
    cores = {
        rid: SimulatedEngineCore(engine, vocab_token_ids=list(range(10, 1000)), eos_token_id=None,
                                 max_model_len=16384, engine_id=rid)
        for rid in ids
    }
    state = ClusterState(stale_after_s=10.0)
    for rid in ids:
        state.register(ReplicaInfo(replica_id=rid, model="m", block_size=BLOCK, num_gpu_blocks=engine.num_blocks))
    scheduler = Scheduler(state, RoutingConfig(policy="prefix_aware" if policy == "ray" else policy, seed=seed))
    ray_router = RayPrefixAffinity(ids, seed) if policy == "ray" else None
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(t: float, kind: str, data: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    for i, r in enumerate(reqs):
        push(r.arrival, "arrive", i)
    push(0.0, "report", None)
    busy = dict.fromkeys(ids, False)
    inflight = dict.fromkeys(ids, 0)
    decisions, meta = {}, {}
    ttft: dict[int, float] = {}
    finish: dict[int, float] = {}
    decision_times = []
    served = dict.fromkeys(ids, 0)
    remaining = len(reqs)
    while events and remaining:
        now, _, kind, data = heapq.heappop(events)
        if kind == "arrive":
            i = data
            r = reqs[i]
            routing = RoutingRequest("m", r.hashes, len(r.tokens), BLOCK)
            t0 = time.perf_counter()
            if ray_router is not None:
                replica = ray_router.choose(r, {k: cores[k].num_running + cores[k].num_waiting for k in ids}, now)
                decision = None
            else:
                decision = scheduler.schedule(routing, now)
                replica = decision.replica_id
            decision_times.append(time.perf_counter() - t0)
            if decision is not None:
                scheduler.on_dispatch(decision, routing, replica, now)
            decisions[i], meta[i] = decision, (routing, replica)
            served[replica] += 1
            inflight[replica] += 1
            cores[replica].add_request(EngineRequest(
                request_id=str(i), model="m", prompt_token_ids=r.tokens,
                sampling=SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0)), now)
            if not busy[replica]:
                busy[replica] = True
                push(now, "step", replica)
        elif kind == "step":
            rid = data
            core = cores[rid]
            result = core.step(now)
            end = now + result.duration
            for out in result.outputs:
                i = int(out.request_id)
                if i not in ttft:
                    ttft[i] = end - reqs[i].arrival
                    if decisions[i] is not None:
                        scheduler.on_first_token(decisions[i], meta[i][0], rid, ttft[i])
                if out.finish_reason is not None:
                    finish[i] = end
                    inflight[rid] -= 1
                    remaining -= 1
                    if decisions[i] is not None:
                        scheduler.on_finish(decisions[i], meta[i][0], rid, True)
            if core.has_work:
                push(end, "step", rid)
            else:
                busy[rid] = False
        elif kind == "report":
            for rid, core in cores.items():
                state.apply_kv_events(rid, core.take_kv_events())
                state.update_stats(rid, ReplicaStats(
                    num_requests_running=core.num_running, num_requests_waiting=core.num_waiting,
                    kv_cache_usage_perc=core.cache.usage), now)
            state.synced_at = now
            push(now + report_interval, "report", None)
    t = np.array([ttft[i] for i in range(len(reqs))])
    e2e = np.array([finish[i] - reqs[i].arrival for i in range(len(reqs))])
    makespan = max(finish.values()) - reqs[0].arrival
    hits = sum(c.counters.prefix_cache_hits for c in cores.values())
    queries = sum(c.counters.prefix_cache_queries for c in cores.values())
    counts = np.array(list(served.values()))
    return {
        "policy": policy,
        "ttft_p50": float(np.percentile(t, 50)), "ttft_p90": float(np.percentile(t, 90)),
        "ttft_p99": float(np.percentile(t, 99)), "e2e_p50": float(np.percentile(e2e, 50)),
        "output_tok_s": sum(r.output_len for r in reqs) / makespan,
        "hit_rate": hits / queries, "spread_max_over_mean": float(counts.max() / counts.mean()),
        "decision_p99_us": float(np.percentile(decision_times, 99) * 1e6),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--rates", default="20,40,60", help="requests per second, comma separated")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--groups", type=int, default=256)
    p.add_argument("--system-len", type=int, default=2048)
    p.add_argument("--question-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-blocks", type=int, default=4096)
    p.add_argument("--policies", default="round_robin,power_of_two,ray,prefix_aware")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write results here")
    a = p.parse_args()
    engine = SimulatedEngineConfig(num_blocks=a.num_blocks)
    rows = []
    for rate in [float(x) for x in a.rates.split(",")]:
        reqs = shared_prefix(a.groups, max(1, a.requests // a.groups), a.system_len, a.question_len,
                             a.output_len, rate, a.seed)
        bound = upper_bound_hit_rate(reqs)
        for policy in a.policies.split(","):
            row = {"rate": rate, "replicas": a.replicas, **simulate(policy, reqs, a.replicas, engine, a.seed),
                   "hit_upper_bound": bound}
            rows.append(row)
            print(f"rate {rate:6.1f}  {policy:13s} TTFT p50 {row['ttft_p50']:7.3f}s p90 {row['ttft_p90']:7.3f}s "
                  f"p99 {row['ttft_p99']:7.3f}s  out {row['output_tok_s']:8.0f} tok/s  hit {row['hit_rate']:.3f} "
                  f"(bound {bound:.3f})  spread {row['spread_max_over_mean']:.2f}  "
                  f"decision p99 {row['decision_p99_us']:.0f}us", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
