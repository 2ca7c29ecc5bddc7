"""A closed-loop streaming load generator for OpenAI-compatible servers.

Each of `concurrency` workers sends streaming chat requests back to back and records time to first
token, inter-token latency and end-to-end latency from the client's side.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class LoadResult:
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        def pct(values: list[float], q: float) -> float:
            if not values:
                return float("nan")
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return {
            "requests": len(self.e2e_s),
            "errors": self.errors,
            "ttft_p50_ms": 1000 * pct(self.ttft_s, 0.5),
            "ttft_p90_ms": 1000 * pct(self.ttft_s, 0.9),
            "ttft_p99_ms": 1000 * pct(self.ttft_s, 0.99),
            "itl_mean_ms": 1000 * statistics.fmean(self.itl_s) if self.itl_s else float("nan"),
            "e2e_p50_ms": 1000 * pct(self.e2e_s, 0.5),
            "req_per_s": len(self.e2e_s) / self.wall_s if self.wall_s else 0.0,
            "output_tok_per_s": self.output_tokens / self.wall_s if self.wall_s else 0.0,
        }


async def _one(client: httpx.AsyncClient, url: str, body: dict, result: LoadResult) -> None:
    start = time.perf_counter()
    last = None
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            result.errors += 1
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices") or not chunk["choices"][0]["delta"].get("content"):
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft_s.append(now - start)
            else:
                result.itl_s.append(now - last)
            last = now
    result.e2e_s.append(time.perf_counter() - start)
    result.output_tokens += tokens


async def run_load(
    base_url: str, *, model: str, concurrency: int, requests: int, prompt: str, max_tokens: int
) -> LoadResult:
    url = base_url.rstrip("/") + "/v1/chat/completions"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = LoadResult()
    remaining = requests

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _one(client, url, body, result)

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await _one(client, url, body, LoadResult())  # warm-up, not counted
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - started
    return result
