"""Discrete-event simulation of routing policies on a fleet of simulated vLLM engines, in virtual time.

The real scheduler code (app/router) routes; the real simulated engine core (app/engines/simulated)
serves; KV events and stats reach the router after a report delay, as they do live. Every policy sees
the same request sequence on an identical fleet, and the hit-rate upper bound (every block seen
before is a hit, as with one infinite cache) is computed on the same requests.

Workloads (Poisson arrivals, seeded):
- shared_prefix: groups x prompts per group sharing a system prompt (GIE "high cache" shape:
  2048-token system prompts, 256-token questions, 256 output tokens).
- low_cache: the same generator with a short shared part and long unique questions (256 + 2048).
- multi_turn: conversations of several turns; each turn's prompt is the whole conversation so far,
  including the answers the engine generated, and arrives a think time after the previous answer.
- multi_adapter: requests for LoRA adapters with Zipf popularity, each adapter with its own system
  prompt; engines have `--max-loras` slots and a load time (policy `prefix_only` is ours without the
  adapter scorer).

    .venv/bin/python benchmarks/routing_sim.py --replicas 8 --rates 60,80,100,120 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.core import SimulatedEngineCore
from app.kv.hashing import get_hasher
from app.protocol.engine import EngineRequest, SamplingParams
from app.router.scheduler import RoutingConfig, RoutingRequest, Scheduler
from app.router.state import ClusterState, ReplicaInfo, ReplicaStats

BLOCK = 16
VOCAB = (10, 1000)
POLICIES = ("round_robin", "power_of_two", "ray", "prefix_aware")
# Ours without the adapter scorer: the prefix-aware profile's plugins, but adapter_affinity.
PREFIX_ONLY = {"profile": {"name": "prefix_only",
                           "filters": [{"type": "kv_saturation"}, {"type": "load_guard"}],
                           "scorers": [{"type": "predicted_ttft"}, {"type": "miss_externality"},
                                       {"type": "prefix_duplication"}],
                           "picker": {"type": "lowest_cost"}}}


@dataclass
class Req:
    arrival: float
    tokens: list[int]
    output_len: int
    hashes: list[int] = field(default_factory=list)
    conversation: int = -1
    turn: int = 0
    adapter: str | None = None


# A follow-up turn: given a finished request, its generated tokens and the finish time, the next request.
FollowUp = Callable[[Req, list[int], float], "Req | None"]


@dataclass
class Workload:
    name: str
    requests: list[Req]
    follow_up: FollowUp | None = None


def _hashes(tokens: list[int]) -> list[int]:
    return get_hasher().block_hashes(tokens, BLOCK)


def shared_prefix(groups: int, per_group: int, system_len: int, question_len: int, output_len: int,
                  rate: float, seed: int, name: str = "shared_prefix") -> Workload:
    rng = random.Random(seed)
    tokens_rng = np.random.default_rng(seed)
    systems = tokens_rng.integers(*VOCAB, size=(groups, system_len)).tolist()
    order = [g for g in range(groups) for _ in range(per_group)]
    rng.shuffle(order)
    t, out = 0.0, []
    for g in order:
        t += rng.expovariate(rate)
        tokens = systems[g] + tokens_rng.integers(*VOCAB, size=question_len).tolist()
        out.append(Req(t, tokens, output_len, _hashes(tokens)))
    return Workload(name, out)


def multi_adapter(adapters: int, requests: int, system_len: int, question_len: int, output_len: int,
                  rate: float, seed: int, zipf: float = 1.0) -> Workload:
    rng = random.Random(seed)
    tokens_rng = np.random.default_rng(seed)
    systems = tokens_rng.integers(*VOCAB, size=(adapters, system_len)).tolist()
    weights = [1.0 / (k + 1) ** zipf for k in range(adapters)]
    t, out = 0.0, []
    for _ in range(requests):
        t += rng.expovariate(rate)
        a = rng.choices(range(adapters), weights)[0]
        name = f"lora-{a}"
        tokens = systems[a] + tokens_rng.integers(*VOCAB, size=question_len).tolist()
        hashes = get_hasher().block_hashes(tokens, BLOCK, lora_name=name, lora_path=f"sim://{name}")
        out.append(Req(t, tokens, output_len, hashes, adapter=name))
    return Workload("multi_adapter", out)


def multi_turn(conversations: int, turns: int, system_len: int, user_len: int, output_len: int,
               rate: float, think_s: float, seed: int) -> Workload:
    """`rate` is new conversations per second; later turns follow each answer after a think time."""
    rng = random.Random(seed)
    tokens_rng = np.random.default_rng(seed)
    system = tokens_rng.integers(*VOCAB, size=system_len).tolist()
    user = tokens_rng.integers(*VOCAB, size=(conversations, turns, user_len)).tolist()
    t, first = 0.0, []
    for c in range(conversations):
        t += rng.expovariate(rate)
        tokens = system + user[c][0]
        first.append(Req(t, tokens, output_len, _hashes(tokens), conversation=c, turn=0))
    think = random.Random(seed + 1)

    def follow_up(req: Req, answer: list[int], finished_at: float) -> Req | None:
        turn = req.turn + 1
        if turn >= turns:
            return None
        tokens = req.tokens + answer + user[req.conversation][turn]
        return Req(finished_at + think.expovariate(1.0 / think_s), tokens, output_len, _hashes(tokens),
                   conversation=req.conversation, turn=turn)

    return Workload("multi_turn", first, follow_up)


class HitBound:
    """Hit rate with one infinite cache: every block any earlier prompt or answer filled is a hit."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def hit_tokens(self, req: Req) -> int:
        usable = (len(req.tokens) - 1) // BLOCK  # vLLM recomputes the last prompt token
        n = 0
        for h in req.hashes[:usable]:
            if h not in self.seen:
                break
            n += 1
        self.seen.update(req.hashes)
        return n * BLOCK

    def finished(self, req: Req, answer: list[int]) -> None:
        self.seen.update(_hashes(req.tokens + answer))


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


def simulate(policy: str, workload: Workload, replicas: int, engine: SimulatedEngineConfig, seed: int,
             report_interval: float = 0.1, routing: dict | None = None, warmup: float = 0.2) -> dict:
    """Run one policy; latency and hit statistics skip the first `warmup` fraction of requests (cold caches)."""
    ids = [f"r{i:03d}" for i in range(replicas)]
    cores = {
        rid: SimulatedEngineCore(engine, vocab_token_ids=list(range(*VOCAB)), eos_token_id=None,
                                 max_model_len=32768, engine_id=rid)
        for rid in ids
    }
    state = ClusterState(stale_after_s=10.0)
    for rid in ids:
        state.register(ReplicaInfo(replica_id=rid, model="m", block_size=BLOCK, num_gpu_blocks=engine.num_blocks,
                                   max_num_seqs=engine.max_num_seqs))
    if policy == "prefix_only":
        config = RoutingConfig(**{**(routing or {}), **PREFIX_ONLY, "seed": seed})
    else:
        config = RoutingConfig(**{**(routing or {}), "policy": "prefix_aware" if policy == "ray" else policy,
                                  "seed": seed})
    scheduler = Scheduler(state, config)
    ray_router = RayPrefixAffinity(ids, seed) if policy == "ray" else None
    bound = HitBound()
    reqs: list[Req] = []
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(t: float, kind: str, data: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    def add(req: Req) -> None:
        reqs.append(req)
        push(req.arrival, "arrive", len(reqs) - 1)

    for r in workload.requests:
        add(r)
    push(0.0, "report", None)
    busy = dict.fromkeys(ids, False)
    decisions: dict[int, object] = {}
    routed: dict[int, RoutingRequest] = {}
    ttft: dict[int, float] = {}
    finish: dict[int, float] = {}
    cached: dict[int, int] = {}
    bound_hits: dict[int, int] = {}
    answers: dict[int, list[int]] = {}
    decision_times: list[float] = []
    # A digest of every ranking, so a refactor can show its decisions are the same ones, request by request.
    digest = hashlib.sha256()
    reasons: dict[str, int] = {}
    served = dict.fromkeys(ids, 0)
    outstanding = len(reqs)
    while events and outstanding:
        now, _, kind, data = heapq.heappop(events)
        if kind == "arrive":
            i = data
            r = reqs[i]
            bound_hits[i] = bound.hit_tokens(r)
            routing_request = RoutingRequest("m", r.hashes, len(r.tokens), BLOCK, adapter=r.adapter)
            t0 = time.perf_counter()
            if ray_router is not None:
                replica = ray_router.choose(r, {k: cores[k].num_running + cores[k].num_waiting for k in ids}, now)
                decision = None
            else:
                decision = scheduler.schedule(routing_request, now)
                replica = decision.replica_id
                digest.update(f"{i}:{','.join(decision.ranked)}:{decision.reason};".encode())
                reasons[decision.reason] = reasons.get(decision.reason, 0) + 1
            decision_times.append(time.perf_counter() - t0)
            if decision is None:
                digest.update(f"{i}:{replica};".encode())
            else:
                scheduler.on_dispatch(decision, routing_request, replica, now)
            decisions[i], routed[i] = decision, routing_request
            served[replica] += 1
            answers[i] = []
            cores[replica].add_request(EngineRequest(
                request_id=str(i), model="m", prompt_token_ids=r.tokens,
                sampling=SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0),
                lora_name=r.adapter, lora_path=f"sim://{r.adapter}" if r.adapter else None), now)
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
                answers[i].extend(out.new_token_ids)
                if i not in ttft:
                    ttft[i] = end - reqs[i].arrival
                    cached[i] = out.num_cached_tokens
                    if decisions[i] is not None:
                        scheduler.on_first_token(decisions[i], routed[i], rid, ttft[i])
                if out.finish_reason is not None:
                    finish[i] = end
                    outstanding -= 1
                    if decisions[i] is not None:
                        scheduler.on_finish(decisions[i], routed[i], rid, True)
                    bound.finished(reqs[i], answers[i])
                    nxt = workload.follow_up(reqs[i], answers[i], end) if workload.follow_up else None
                    answers[i] = []
                    if nxt is not None:
                        add(nxt)
                        outstanding += 1
            if core.has_work:
                push(end, "step", rid)
            else:
                busy[rid] = False
        elif kind == "report":
            for rid, core in cores.items():
                state.apply_kv_events(rid, core.take_kv_events())
                state.update_stats(rid, ReplicaStats(
                    num_requests_running=core.num_running, num_requests_waiting=core.num_waiting,
                    kv_cache_usage_perc=core.cache.usage,
                    adapters=core.adapters if workload.name == "multi_adapter" else None), now)
            state.synced_at = now
            push(now + report_interval, "report", None)
    by_arrival = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival)
    measured = by_arrival[int(len(reqs) * warmup):]
    t = np.array([ttft[i] for i in measured])
    e2e = np.array([finish[i] - reqs[i].arrival for i in measured])
    prompt_tokens = sum(len(reqs[i].tokens) for i in measured)
    makespan = max(finish.values()) - reqs[by_arrival[0]].arrival
    counts = np.array(list(served.values()))
    return {
        "policy": policy, "workload": workload.name, "requests": len(reqs), "measured": len(measured),
        "ttft_p50": float(np.percentile(t, 50)), "ttft_p90": float(np.percentile(t, 90)),
        "ttft_p99": float(np.percentile(t, 99)), "e2e_p50": float(np.percentile(e2e, 50)),
        "e2e_p90": float(np.percentile(e2e, 90)),
        "output_tok_s": sum(r.output_len for r in reqs) / makespan,
        "hit_rate": sum(cached[i] for i in measured) / prompt_tokens,
        "hit_upper_bound": sum(bound_hits[i] for i in measured) / prompt_tokens,
        "spread_max_over_mean": float(counts.max() / counts.mean()),
        "decision_p50_us": float(np.percentile(decision_times, 50) * 1e6),
        "decision_p99_us": float(np.percentile(decision_times, 99) * 1e6),
        "reasons": reasons,
        "decisions_sha256": digest.hexdigest(),
        "adapter_loads_per_1k": 1000 * sum(c.adapter_loads for c in cores.values()) / len(reqs),
        "adapters_used": len({r.adapter for r in reqs if r.adapter}),
        "ttft_model": scheduler.ttft_model.coefficients if ray_router is None else None,
    }


def build_workload(a: argparse.Namespace, rate: float) -> Workload:
    groups = a.groups or 32 * a.replicas
    if a.workload == "shared_prefix":
        return shared_prefix(groups, a.prompts_per_group, a.system_len, a.question_len, a.output_len, rate, a.seed)
    if a.workload == "low_cache":
        return shared_prefix(groups, a.prompts_per_group, 256, 2048, a.output_len, rate, a.seed, name="low_cache")
    if a.workload == "multi_adapter":
        return multi_adapter(a.adapters, a.requests, a.system_len, a.question_len, a.output_len, rate, a.seed)
    return multi_turn(a.conversations or 64 * a.replicas, a.turns, a.system_len, a.question_len, a.output_len,
                      rate, a.think_s, a.seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--workload", choices=("shared_prefix", "low_cache", "multi_turn", "multi_adapter"),
                   default="shared_prefix")
    p.add_argument("--adapters", type=int, default=32, help="multi_adapter: adapters, Zipf popularity")
    p.add_argument("--requests", type=int, default=4000, help="multi_adapter: requests")
    p.add_argument("--max-loras", type=int, default=4, help="multi_adapter: adapter slots per engine")
    p.add_argument("--lora-load-s", type=float, default=0.05, help="multi_adapter: seconds to load an adapter")
    p.add_argument("--rates", default="60,80,100,120",
                   help="requests per second (multi_turn: new conversations per second), comma separated")
    p.add_argument("--groups", type=int, default=0, help="prefix groups (default 32 per replica)")
    p.add_argument("--prompts-per-group", type=int, default=16)
    p.add_argument("--system-len", type=int, default=2048)
    p.add_argument("--question-len", type=int, default=256, help="question, or user turn, length")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--conversations", type=int, default=0, help="multi_turn: default 64 per replica")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--think-s", type=float, default=5.0, help="multi_turn: mean think time between turns")
    p.add_argument("--num-blocks", type=int, default=16384,
                   help="KV blocks per engine (16384 x 16 tokens: an 8B model on one 80 GB GPU holds more)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of requests (by arrival) not measured")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routing", default="{}", help="RoutingConfig overrides for our policy, as JSON")
    p.add_argument("--json", help="append results to this JSON list")
    a = p.parse_args()
    engine = SimulatedEngineConfig(num_blocks=a.num_blocks, max_num_seqs=a.max_num_seqs, max_loras=a.max_loras,
                                   lora_load_s=a.lora_load_s)
    rows = []
    for rate in [float(x) for x in a.rates.split(",")]:
        workload = build_workload(a, rate)
        for policy in a.policies.split(","):
            started = time.perf_counter()
            row = {"rate": rate, "replicas": a.replicas, "num_blocks": a.num_blocks,
                   **simulate(policy, workload, a.replicas, engine, a.seed, routing=json.loads(a.routing),
                              warmup=a.warmup),
                   "sim_wall_s": time.perf_counter() - started}
            rows.append(row)
            print(f"{a.workload} x{a.replicas} rate {rate:6.1f} {policy:13s} TTFT p50 {row['ttft_p50']:7.3f}s "
                  f"p90 {row['ttft_p90']:7.3f}s p99 {row['ttft_p99']:7.3f}s  e2e p50 {row['e2e_p50']:6.2f}s  "
                  f"out {row['output_tok_s']:8.0f} tok/s  hit {row['hit_rate']:.3f} "
                  f"(bound {row['hit_upper_bound']:.3f})  spread {row['spread_max_over_mean']:.2f}  "
                  f"decision p99 {row['decision_p99_us']:.0f}us  loads/1k {row['adapter_loads_per_1k']:.0f}  "
                  f"[{row['sim_wall_s']:.0f}s]", flush=True)
            if a.json:
                try:
                    with open(a.json) as f:
                        existing = json.load(f)
                except FileNotFoundError:
                    existing = []
                with open(a.json, "w") as f:
                    json.dump([*existing, row], f, indent=1)


if __name__ == "__main__":
    main()
