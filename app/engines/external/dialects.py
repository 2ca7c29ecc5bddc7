"""What an external server's /metrics page says, in the dialect it speaks: vLLM's, SGLang's, or none.

vLLM's page gives the router everything: load, KV-cache usage, prefix-cache counters, cache geometry.
SGLang's gives load, KV usage (`sglang:token_usage`) and cached-token counts, but not block geometry,
so the declared `block_size` applies. Any other OpenAI-compatible server gives nothing the router can
read: it is routed on the gateway's own count of requests in flight there, kept alive by its health
route. Whatever a server lacks is said once in the log and shown on the gateway's metrics
(`gateway_replica_metrics_dialect`).
"""

from __future__ import annotations

import time
from typing import Literal

from app.engines.vllm.metrics import MetricsFormatError, engine_stats, samples
from app.protocol.engine import CacheConfig, EngineStats

Dialect = Literal["vllm", "sglang", "none"]

MISSING: dict[Dialect, str] = {
    "vllm": "",
    "sglang": "block geometry (the declared block_size applies) and KV events (the router's prefix index is "
              "its record of what it sent)",
    "none": "load and cache metrics (routed on the gateway's own in-flight count; prefix keys are its record of "
            "what it sent; alive while its health route answers)",
}

_SGLANG_GAUGES = {
    "sglang:num_running_reqs": "num_requests_running",
    "sglang:num_queue_reqs": "num_requests_waiting",
    "sglang:token_usage": "kv_cache_usage_perc",
    "sglang:max_total_num_tokens": "max_total_num_tokens",
}
_SGLANG_COUNTERS = {
    "sglang:prompt_tokens_total": "prompt_tokens",
    "sglang:generation_tokens_total": "generation_tokens",
    "sglang:cached_tokens_total": "prefix_cache_hits",
    "sglang:num_requests_total": "request_success",
}
_REQUIRED_SGLANG = ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage")


def dialect_of(text: str) -> Dialect | None:
    """The dialect a /metrics page speaks, or None for a page the router cannot read."""
    if "vllm:num_requests_running" in text:
        return "vllm"
    if "sglang:num_running_reqs" in text:
        return "sglang"
    return None


def read_stats(dialect: Dialect, text: str, *, engine_id: str, model: str, declared: CacheConfig) -> EngineStats:
    """The server's stats from its page. Raises MetricsFormatError if the page lacks what the dialect needs."""
    if dialect == "vllm":
        return engine_stats(text, engine_id=engine_id, model=model, hash_seed=declared.hash_seed, declared=declared)
    if dialect == "sglang":
        return _sglang_stats(text, engine_id=engine_id, model=model, declared=declared)
    return blank_stats(engine_id=engine_id, model=model, declared=declared)


def blank_stats(*, engine_id: str, model: str, declared: CacheConfig) -> EngineStats:
    """Nothing known about the server's load: the router's own in-flight counts stand in for it."""
    return EngineStats(engine_id=engine_id, model=model, cache_config=declared, timestamp=time.time())


def _sglang_stats(text: str, *, engine_id: str, model: str, declared: CacheConfig) -> EngineStats:
    values: dict[str, float] = {}
    for name, _, value in samples(text, "sglang:"):
        field = _SGLANG_GAUGES.get(name) or _SGLANG_COUNTERS.get(name)
        if field is not None:  # summed over data-parallel ranks, as vLLM's engines are
            values[field] = values.get(field, 0.0) + value
    missing = [name for name in _REQUIRED_SGLANG if _SGLANG_GAUGES[name] not in values]
    if missing:
        raise MetricsFormatError(f"the /metrics page lacks {', '.join(missing)}; is this an SGLang server started "
                                 "with --enable-metrics?")
    ranks = max(1, text.count("sglang:token_usage{"))
    capacity = values.pop("max_total_num_tokens", 0.0)
    cache = declared
    if capacity > 0:
        cache = declared.model_copy(update={"num_gpu_blocks": int(capacity) // max(1, declared.block_size)})
    # SGLang counts cached prompt tokens; every prompt token is a lookup, as vLLM counts its queries.
    values["prefix_cache_queries"] = values.get("prompt_tokens", 0.0)
    return EngineStats(
        engine_id=engine_id, model=model,
        num_requests_running=int(values["num_requests_running"]),
        num_requests_waiting=int(values["num_requests_waiting"]),
        kv_cache_usage_perc=min(1.0, max(0.0, values["kv_cache_usage_perc"] / ranks)),
        **{name: int(values[name]) for name in ("prompt_tokens", "generation_tokens", "prefix_cache_hits",
                                                "prefix_cache_queries", "request_success") if name in values},
        cache_config=cache, timestamp=time.time(),
    )
