"""Reads the load and counters the router needs out of a vLLM server's Prometheus text.

vLLM's /metrics page is long (histograms per engine); the router needs a dozen series. This reads
only the wanted lines, sums them over the `engine` label (data-parallel ranks), and never builds the
full metric families, so reading it every few hundred milliseconds stays cheap.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

from app.protocol.engine import AdapterLoad, CacheConfig, EngineCounters, EngineStats

_GAUGES = {
    "vllm:num_requests_running": "num_requests_running",
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc": "legacy_kv_cache_usage_perc",  # its name in older vLLM
}
_COUNTERS = {
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:external_prefix_cache_queries_total": "external_prefix_cache_queries",
    "vllm:external_prefix_cache_hits_total": "external_prefix_cache_hits",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:request_success_total": "request_success",
    "vllm:num_preemptions_total": "num_preemptions",
}
_CACHE_INFO = "vllm:cache_config_info"
LORA_INFO = "vllm:lora_requests_info"
"""With --enable-lora: labels max_lora and the comma-joined waiting and running adapters; the value is the
time it was set, and every label set stays a series of its own, so the latest is the one with the largest."""
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class MetricsFormatError(ValueError):
    """The page lacks what every vLLM server exports (not a vLLM server, or a renamed metric)."""


def split_sample(line: str) -> tuple[str, str, float] | None:
    """(name, label text, value) of a sample line, or None for comments and blanks."""
    if not line or line[0] == "#":
        return None
    brace = line.find("{")
    space = line.rfind(" ")
    if space < 0:
        return None
    if brace >= 0 and brace < space:
        name, labels = line[:brace], line[brace + 1 : line.rindex("}")]
    else:
        name, labels = line[:space], ""
    try:
        return name, labels, float(line[space + 1 :])
    except ValueError:
        return None


def samples(text: str, prefix: str) -> Iterator[tuple[str, str, float]]:
    """(name, label text, value) of each sample line whose metric name starts with `prefix`."""
    for line in text.splitlines():
        if line.startswith(prefix):
            parsed = split_sample(line)
            if parsed is not None:
                yield parsed


def parse_vllm_metrics(
    text: str, *, hash_seed: str = "0", declared: CacheConfig | None = None
) -> tuple[dict[str, float], CacheConfig]:
    """The wanted series (gauges and counters by EngineStats field, summed over engines) and the cache config
    (from `declared` when the page has none: vLLM before it exported vllm:cache_config_info)."""
    values: dict[str, float] = {}
    cache: CacheConfig | None = None
    for name, labels, value in samples(text, "vllm:"):
        field = _GAUGES.get(name) or _COUNTERS.get(name)
        if field is not None:
            values[field] = values.get(field, 0.0) + value
        elif name == _CACHE_INFO and cache is None:
            info = dict(_LABEL.findall(labels))
            cache = CacheConfig(
                block_size=int(info.get("block_size", 0) or 0),
                num_gpu_blocks=int(info.get("num_gpu_blocks", 0) or 0),
                prefix_caching_hash_algo=info.get("prefix_caching_hash_algo", "sha256"),
                hash_seed=hash_seed,
                enable_prefix_caching=info.get("enable_prefix_caching", "True") == "True",
            )
    cache = cache or declared
    legacy = values.pop("legacy_kv_cache_usage_perc", None)
    if "kv_cache_usage_perc" not in values and legacy is not None:
        values["kv_cache_usage_perc"] = legacy
    missing = [name for name, field in _GAUGES.items() if field not in values and not field.startswith("legacy")]
    if cache is None or missing:
        raise MetricsFormatError(
            f"the /metrics page lacks {', '.join([*missing, *([_CACHE_INFO] if cache is None else [])])}; "
            "is this a vLLM server of a supported version?"
        )
    return values, cache


def adapter_load(text: str) -> AdapterLoad | None:
    """The adapters of vLLM's latest `vllm:lora_requests_info` series, or None without LoRA."""
    if LORA_INFO not in text:  # a substring search, far cheaper than a second pass over the page
        return None
    latest: tuple[float, str] | None = None
    for _, labels, value in samples(text, LORA_INFO + "{"):
        if latest is None or value > latest[0]:
            latest = (value, labels)
    if latest is None:
        return None
    info = dict(_LABEL.findall(latest[1]))
    names = lambda key: [name for name in info.get(key, "").split(",") if name]  # noqa: E731
    return AdapterLoad(max_loras=int(float(info.get("max_lora") or 0)), running=names("running_lora_adapters"),
                       waiting=names("waiting_lora_adapters"))


def engine_stats(
    text: str, *, engine_id: str, model: str, hash_seed: str = "0", engines: int | None = None,
    declared: CacheConfig | None = None,
) -> EngineStats:
    """An EngineStats snapshot from a /metrics page. KV usage is averaged over `engines` ranks."""
    values, cache = parse_vllm_metrics(text, hash_seed=hash_seed, declared=declared)
    ranks = max(1, engines or text.count(_CACHE_INFO + "{"))
    return EngineStats(
        engine_id=engine_id,
        model=model,
        num_requests_running=int(values["num_requests_running"]),
        num_requests_waiting=int(values["num_requests_waiting"]),
        kv_cache_usage_perc=min(1.0, max(0.0, values["kv_cache_usage_perc"] / ranks)),
        adapters=adapter_load(text),
        **{name: int(values.get(name, 0)) for name in EngineCounters.model_fields},
        cache_config=cache,
        timestamp=time.time(),
    )
