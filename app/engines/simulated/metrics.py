"""The simulated engine's Prometheus metrics, under vLLM's names and labels.

Gauges and counters are read from the engine's stats at scrape time; latency histograms are
observed as tokens are delivered. Each engine has its own registry so several can share a process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.engines.vllm.metrics import LORA_INFO
from app.metrics import MetricSet
from app.protocol.engine import EngineCounters, EngineStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    20.0, 40.0, 80.0)
_COUNTERS = {name: field.description or name for name, field in EngineCounters.model_fields.items()}


class _StatsCollector(Collector):
    def __init__(self, labels: dict[str, str], stats: Callable[[], EngineStats]) -> None:
        self._labels = labels
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        names, values = list(self._labels), list(self._labels.values())
        for name, value, doc in (
            ("num_requests_running", stats.num_requests_running, "Requests in the running batch."),
            ("num_requests_waiting", stats.num_requests_waiting, "Requests waiting to be scheduled."),
            ("kv_cache_usage_perc", stats.kv_cache_usage_perc, "KV cache usage (1 means 100 percent)."),
        ):
            gauge = GaugeMetricFamily(f"vllm:{name}", doc, labels=names)
            gauge.add_metric(values, value)
            yield gauge
        for name, doc in _COUNTERS.items():
            counter = CounterMetricFamily(f"vllm:{name}", doc, labels=names)
            counter.add_metric(values, getattr(stats, name))
            yield counter
        adapters = stats.adapters
        if adapters is not None:
            # vLLM's shape: the adapters as labels, the time as the value (readers take the latest series).
            lora = GaugeMetricFamily(LORA_INFO, "Running stats on LoRA requests.",
                                     labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            lora.add_metric([str(adapters.max_loras), ",".join(adapters.waiting), ",".join(adapters.running)],
                            stats.timestamp or time.time())
            yield lora
        cache = stats.cache_config
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the KV cache config.",
            labels=[*names, "block_size", "num_gpu_blocks", "enable_prefix_caching", "prefix_caching_hash_algo"],
        )
        info.add_metric(
            [*values, str(cache.block_size), str(cache.num_gpu_blocks), str(cache.enable_prefix_caching),
             cache.prefix_caching_hash_algo],
            1.0,
        )
        yield info


class EngineMetrics(MetricSet):
    """Per-engine registry: stats-backed gauges/counters plus request latency histograms."""

    def __init__(self, *, model: str, engine: str, stats: Callable[[], EngineStats]) -> None:
        super().__init__()
        labels = {"model_name": model, "engine": engine}
        self.registry.register(_StatsCollector(labels, stats))

        def histogram(name: str, doc: str) -> Histogram:
            return self.histogram(name, doc, list(labels), _LATENCY_BUCKETS).labels(**labels)

        self._ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.")
        self._itl = histogram("vllm:inter_token_latency_seconds", "Time between output tokens.")
        self._e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.")

    def observe_token(self, arrival: float, previous: float | None, now: float, num_tokens: int) -> None:
        if previous is None:
            self._ttft.observe(now - arrival)
        elif num_tokens:
            gap = (now - previous) / num_tokens
            for _ in range(num_tokens):
                self._itl.observe(gap)

    def observe_finish(self, arrival: float, now: float) -> None:
        self._e2e.observe(now - arrival)


def sglang_page(stats: EngineStats, model: str) -> bytes:
    """The engine's state under SGLang's metric names, so the simulator can stand in for an SGLang server."""
    labels = f'{{model_name="{model}"}}'
    cache = stats.cache_config
    samples = {
        "sglang:num_running_reqs": stats.num_requests_running,
        "sglang:num_queue_reqs": stats.num_requests_waiting,
        "sglang:token_usage": stats.kv_cache_usage_perc,
        "sglang:max_total_num_tokens": cache.num_gpu_blocks * cache.block_size,
        "sglang:prompt_tokens_total": stats.prompt_tokens,
        "sglang:generation_tokens_total": stats.generation_tokens,
        "sglang:cached_tokens_total": stats.prefix_cache_hits,
        "sglang:num_requests_total": stats.request_success,
    }
    return "".join(f"{name}{labels} {float(value)}\n" for name, value in samples.items()).encode()
