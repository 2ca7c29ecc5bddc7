"""The gateway core's Prometheus metrics: routing decisions, the engines' streams, the split hop.

Each ingress replica registers them in its own registry (app/openai/metrics.py), next to the request
metrics, so one /metrics page shows both.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from app.metrics import DECISION_BUCKETS, TTFT_BUCKETS, MetricSet


class RouterMetrics(MetricSet):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.decision_seconds = self.histogram(
            "gateway_routing_decision_seconds", "Time to rank the replicas for one request.",
            ["model"], DECISION_BUCKETS,
        )
        self.decisions = self.counter(
            "gateway_routing_decisions", "Routing decisions by policy and reason.", ["model", "policy", "reason"],
        )
        self.predicted_ttft = self.histogram(
            "gateway_routing_predicted_ttft_seconds", "TTFT the cost model predicted for the chosen replica.",
            ["model"], TTFT_BUCKETS,
        )
        self.observed_ttft = self.histogram(
            "gateway_routing_observed_ttft_seconds", "TTFT observed from dispatch to the first output.",
            ["model"], TTFT_BUCKETS,
        )
        self.ttft_error = self.histogram(
            "gateway_routing_ttft_prediction_error_seconds", "|observed - predicted| TTFT.",
            ["model"], TTFT_BUCKETS,
        )
        self.routed_prompt_tokens = self.counter(
            "gateway_routing_prompt_tokens", "Prompt tokens of routed requests.", ["model"]
        )
        self.estimated_hit_tokens = self.counter(
            "gateway_routing_estimated_prefix_hit_tokens",
            "Prompt tokens the router expected the chosen replica to have cached.", ["model"],
        )
        self.engine_hit_tokens = self.counter(
            "gateway_routing_engine_prefix_hit_tokens",
            "Prompt tokens the engine reported served from its prefix cache.", ["model"],
        )
        self.replica_load = self.gauge(
            "gateway_replica_load", "Per engine replica: in-flight (this router), running, waiting, KV usage.",
            ["model", "replica", "signal"],
        )
        self.replica_adapters = self.gauge(
            "gateway_replica_adapters",
            "Per engine replica with LoRA adapters: slots, running / waiting / loaded adapters, and the loads and "
            "evictions it has counted (the simulator counts them; vLLM does not say).",
            ["model", "replica", "signal"],
        )
        self.metrics_dialect = self.gauge(
            "gateway_replica_metrics_dialect",
            "1 for what each engine replica's metrics speak: vllm (everything the router reads), sglang (no block "
            "geometry or KV events), or none (routed on this router's in-flight count alone).",
            ["model", "replica", "dialect"],
        )
        self.prefix_keys = self.gauge(
            "gateway_routing_prefix_keys",
            "1 for the kind of prefix keys a model is routed on: exact (the engines' block hashes, from the "
            "model's tokenizer) or approximate (text blocks, when the gateway has no tokenizer for it).",
            ["model", "kind"],
        )
        self.queued = self.gauge(
            "gateway_queued_requests",
            "Requests waiting at this ingress replica for an engine with room (every candidate at its "
            "max_ongoing_requests).", ["model"],
        )
        self.shed = self.counter(
            "gateway_shed_requests",
            "Requests refused with 503 engine_overloaded because the gateway's queue for the model was full.",
            ["model", "reason"],
        )
        self.state_age = self.gauge(
            "gateway_cluster_state_age_seconds", "Time since this router last synced with the state actor.",
        )


class DisaggregationMetrics(MetricSet):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.requests = self.counter(
            "gateway_disaggregation_requests",
            "Requests of split models by path: direct (below the threshold or a mixed replica), split, "
            "prefill_failed (decode computed the prompt), no_prefill (no prefill replica known).",
            ["model", "path"],
        )
        self.prefill_seconds = self.histogram(
            "gateway_disaggregation_prefill_seconds",
            "The split hop: from sending the prefill request to having its kv_transfer_params.",
            ["model"], TTFT_BUCKETS,
        )


def engine_streams_counter(registry: CollectorRegistry) -> Counter:
    return MetricSet(registry).counter(
        "gateway_engine_streams",
        "Engine requests by how they reached the engine: direct (HTTP to its own server), serve (through the "
        "engine replica), direct_failed (the attempt failed before any output).",
        ["model", "path"],
    )
