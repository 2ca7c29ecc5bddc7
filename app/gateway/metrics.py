"""The gateway core's Prometheus metrics: routing decisions, the engines' streams, the split hop.

Each ingress replica registers them in its own registry (app/openai/metrics.py), next to the request
metrics, so one /metrics page shows both.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.decision_seconds = Histogram(
            "gateway_routing_decision_seconds", "Time to rank the replicas for one request.",
            ["model"], buckets=_DECISION_BUCKETS, registry=r,
        )
        self.decisions = Counter(
            "gateway_routing_decisions", "Routing decisions by policy and reason.", ["model", "policy", "reason"],
            registry=r,
        )
        self.predicted_ttft = Histogram(
            "gateway_routing_predicted_ttft_seconds", "TTFT the cost model predicted for the chosen replica.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.observed_ttft = Histogram(
            "gateway_routing_observed_ttft_seconds", "TTFT observed from dispatch to the first output.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.ttft_error = Histogram(
            "gateway_routing_ttft_prediction_error_seconds", "|observed - predicted| TTFT.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.routed_prompt_tokens = Counter(
            "gateway_routing_prompt_tokens", "Prompt tokens of routed requests.", ["model"], registry=r
        )
        self.estimated_hit_tokens = Counter(
            "gateway_routing_estimated_prefix_hit_tokens",
            "Prompt tokens the router expected the chosen replica to have cached.", ["model"], registry=r,
        )
        self.engine_hit_tokens = Counter(
            "gateway_routing_engine_prefix_hit_tokens",
            "Prompt tokens the engine reported served from its prefix cache.", ["model"], registry=r,
        )
        self.replica_load = Gauge(
            "gateway_replica_load", "Per engine replica: in-flight (this router), running, waiting, KV usage.",
            ["model", "replica", "signal"], registry=r,
        )
        self.prefix_keys = Gauge(
            "gateway_routing_prefix_keys",
            "1 for the kind of prefix keys a model is routed on: exact (the engines' block hashes, from the "
            "model's tokenizer) or approximate (text blocks, when the gateway has no tokenizer for it).",
            ["model", "kind"], registry=r,
        )
        self.queued = Gauge(
            "gateway_queued_requests",
            "Requests waiting at this ingress replica for an engine with room (every candidate at its "
            "max_ongoing_requests).", ["model"], registry=r,
        )
        self.shed = Counter(
            "gateway_shed_requests",
            "Requests refused with 503 engine_overloaded because the gateway's queue for the model was full.",
            ["model", "reason"], registry=r,
        )
        self.state_age = Gauge(
            "gateway_cluster_state_age_seconds", "Time since this router last synced with the state actor.",
            registry=r,
        )


_PREFILL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class DisaggregationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gateway_disaggregation_requests",
            "Requests of split models by path: direct (below the threshold or a mixed replica), split, "
            "prefill_failed (decode computed the prompt), no_prefill (no prefill replica known).",
            ["model", "path"], registry=registry,
        )
        self.prefill_seconds = Histogram(
            "gateway_disaggregation_prefill_seconds",
            "The split hop: from sending the prefill request to having its kv_transfer_params.",
            ["model"], buckets=_PREFILL_BUCKETS, registry=registry,
        )


def engine_streams_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "gateway_engine_streams",
        "Engine requests by how they reached the engine: direct (HTTP to its own server), serve (through the "
        "engine replica), direct_failed (the attempt failed before any output).",
        ["model", "path"], registry=registry,
    )
