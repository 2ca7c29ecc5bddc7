"""Gateway metrics with prometheus-client: requests by model, endpoint and status; latencies; tokens.

Each ingress replica owns one registry (not the process-global one), so tests and the standalone
server can create several without name clashes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests by served model, endpoint and HTTP status.",
            ["model", "endpoint", "status"], registry=r,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds", "Time from arrival to the first generated token.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "gateway_e2e_request_latency_seconds", "Time from arrival to the last token.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens.", ["model"], registry=r)
        self.cached_prompt_tokens = Counter(
            "gateway_cached_prompt_tokens", "Prompt tokens the engine served from its prefix cache.",
            ["model"], registry=r,
        )
        self.generation_tokens = Counter("gateway_generation_tokens", "Generated tokens.", ["model"], registry=r)
        self.inflight = Gauge("gateway_inflight_requests", "Requests being served now.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
