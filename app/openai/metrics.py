"""Request metrics of an OpenAI serving: requests by model, endpoint and HTTP status; latencies; tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from app.metrics import MetricSet


class ServingMetrics(MetricSet):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.requests = self.counter(
            "gateway_requests", "Requests by served model, endpoint and HTTP status.", ["model", "endpoint", "status"]
        )
        self.ttft = self.histogram(
            "gateway_time_to_first_token_seconds", "Time from arrival to the first generated token.", ["model"]
        )
        self.e2e = self.histogram("gateway_e2e_request_latency_seconds", "Time from arrival to the last token.",
                                  ["model"])
        self.prompt_tokens = self.counter("gateway_prompt_tokens", "Prompt tokens.", ["model"])
        self.cached_prompt_tokens = self.counter(
            "gateway_cached_prompt_tokens", "Prompt tokens the engine served from its prefix cache.", ["model"]
        )
        self.generation_tokens = self.counter("gateway_generation_tokens", "Generated tokens.", ["model"])
        self.inflight = self.gauge("gateway_inflight_requests", "Requests being served now.")
        self.key_fallbacks = self.counter(
            "gateway_prefix_key_fallbacks",
            "Requests routed on load alone because the gateway cannot render their prompt as the engine will, "
            "by reason: content_parts (images and other non-text parts), tool_messages (tool calls or results "
            "in the conversation).", ["model", "reason"],
        )
        self.traffic_requests = self.counter(
            "gateway_traffic_requests",
            "Requests to a traffic split's name, by the target that served them.", ["name", "target"],
        )
        self.traffic_weight = self.gauge(
            "gateway_traffic_weight", "Each traffic split's weights in force, by target (a rollout as it moves).",
            ["name", "target"],
        )
        self.traffic_ttft = self.histogram(
            "gateway_traffic_time_to_first_token_seconds",
            "Time to the first token of streamed requests to a traffic split's name, by target (compare versions "
            "during a rollout).", ["name", "target"],
        )
        self.traffic_tokens = self.counter(
            "gateway_traffic_tokens", "Tokens of requests to a traffic split's name, by target and kind "
            "(prompt, generation).", ["name", "target", "kind"],
        )
        self.live_config_errors = self.counter(
            "gateway_live_config_errors",
            "Live settings (the ingress user_config, or another replica's change) refused here; what was in force "
            "kept serving. The log says why.",
        )
