"""Builds the Serve application from a GatewayConfig; `serve run` imports `build_app`.

Deployment names: `ingress`; per served model `engine-<model>` (mixed engines) and, with
disaggregation, `prefill-<model>` and `decode-<model>`; for a model served by external servers,
`endpoints-<model>` (their watcher). Use them in a config's `deployments:` overrides.
"""

from __future__ import annotations

import re
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from app.config import GatewayConfig, ModelConfig, parse_gateway_config
from app.config.live import digest
from app.deployments.endpoint_watcher import EndpointWatcher
from app.deployments.engine_replica import EngineServer
from app.deployments.ingress import OpenAIIngress

_ROLE_PREFIX = {"mixed": "engine", "prefill": "prefill", "decode": "decode", "endpoints": "endpoints"}


def engine_deployment_name(model_name: str, role: str = "mixed") -> str:
    """`engine-<model>`, `prefill-<model>`, `decode-<model>`, or `endpoints-<model>` (external servers)."""
    return f"{_ROLE_PREFIX[role]}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", model_name).strip("-")


# The Serve request router on the engine deployments: ours honours the gateway's ranking; the baselines
# that rank inside Serve's handle bring their own (None: Serve's built-in power-of-two default).
_GATEWAY_ROUTER = "app.deployments.serve_request_router:GatewayRequestRouter"
_HANDLE_ROUTERS = {
    "power_of_two": None,
    "ray_prefix_cache_affinity": (
        "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter"
    ),
}


def _request_router_config(config: GatewayConfig) -> dict[str, Any]:
    routing = config.routing
    router_class = _GATEWAY_ROUTER if routing.ranks_at_gateway else _HANDLE_ROUTERS[routing.policy]
    if router_class is None:
        return {}
    return {"request_router_config": RequestRouterConfig(request_router_class=router_class)}


def _engine_app(model: ModelConfig, role: str, config: GatewayConfig) -> Application:
    d = model.group(role)
    # A split model is always ranked by the gateway's scheduler (it picks decode, then prefill).
    routers = _request_router_config(config) if model.disaggregation is None else {
        "request_router_config": RequestRouterConfig(request_router_class=_GATEWAY_ROUTER)
    }
    return EngineServer.options(
        name=engine_deployment_name(model.name, role),
        num_replicas=d.num_replicas,
        max_ongoing_requests=d.max_ongoing_requests,
        max_queued_requests=d.max_queued_requests,
        ray_actor_options=d.ray_actor_options,
        health_check_period_s=d.health_check_period_s,
        **routers,
    ).bind(model.model_dump(mode="json"), config.cluster_state.model_dump(mode="json"), role,
           digest(config.model_dump(mode="json")))


def _endpoint_watcher_app(model: ModelConfig, config: GatewayConfig) -> Application:
    return EndpointWatcher.options(name=engine_deployment_name(model.name, "endpoints")).bind(
        model.model_dump(mode="json"), config.cluster_state.model_dump(mode="json")
    )


def _engine_apps(model: ModelConfig, config: GatewayConfig) -> dict[str, Application]:
    if model.is_external:
        # No engines to run: one watcher makes the servers replicas to the router.
        return {"endpoints": _endpoint_watcher_app(model, config)}
    return {role: _engine_app(model, role, config) for role in model.roles}


def build_gateway(config: GatewayConfig) -> Application:
    engines = {model.name: _engine_apps(model, config) for model in config.models}
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
