"""Builds the Serve application from a GatewayConfig; `serve run` imports `build_app`.

Deployment names: `ingress`, and `engine-<model>` per served model (use them in a config's
`deployments:` overrides).
"""

from __future__ import annotations

import re
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from app.config import GatewayConfig, ModelConfig, parse_gateway_config
from app.deployments.engine import EngineServer
from app.deployments.ingress import OpenAIIngress


def engine_deployment_name(model_name: str) -> str:
    return "engine-" + re.sub(r"[^A-Za-z0-9_-]+", "-", model_name).strip("-")


# Which Serve request router each routing policy needs on the engine deployments.
_REQUEST_ROUTERS = {
    "prefix_aware": "app.deployments.request_router:GatewayRequestRouter",
    "round_robin": "app.deployments.request_router:GatewayRequestRouter",
    "power_of_two": None,  # Serve's built-in default
    "ray_prefix_cache_affinity": (
        "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter"
    ),
}


def _request_router_config(config: GatewayConfig) -> dict[str, Any]:
    router_class = _REQUEST_ROUTERS[config.routing.policy]
    if router_class is None:
        return {}
    return {"request_router_config": RequestRouterConfig(request_router_class=router_class)}


def _engine_app(model: ModelConfig, config: GatewayConfig) -> Application:
    d = model.deployment
    return EngineServer.options(
        name=engine_deployment_name(model.name),
        num_replicas=d.num_replicas,
        max_ongoing_requests=d.max_ongoing_requests,
        max_queued_requests=d.max_queued_requests,
        ray_actor_options=d.ray_actor_options,
        health_check_period_s=d.health_check_period_s,
        **_request_router_config(config),
    ).bind(model.model_dump(mode="json"), config.cluster_state.model_dump(mode="json"))


def build_gateway(config: GatewayConfig) -> Application:
    engines = {model.name: _engine_app(model, config) for model in config.models}
    ingress = config.ingress
    return OpenAIIngress.options(
        name="ingress",
        num_replicas=ingress.num_replicas,
        max_ongoing_requests=ingress.max_ongoing_requests,
        ray_actor_options=ingress.ray_actor_options,
    ).bind(config.model_dump(mode="json"), engines)


def build_app(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy` (import_path app.deployments.builder:build_app)."""
    return build_gateway(parse_gateway_config(args))
