"""A whole Serve config file (`serve run`/`serve deploy`, a RayService's serveConfigV2): Serve's own
sections checked strictly, and each application's `args` checked as the gateway's config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from app.config.gateway import ConfigError, GatewayConfig, _Strict, describe
from app.config.live import LiveConfig, applied, live_state_of, merged


class HTTPOptionsConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    root_path: str = ""
    request_timeout_s: float | None = None
    keep_alive_timeout_s: float | None = None


class DeploymentOverride(_Strict):
    """Serve's per-deployment overrides, by deployment name (`ingress`, `engine-<model>`)."""

    name: str
    num_replicas: int | Literal["auto"] | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] | None = None
    user_config: dict[str, Any] | None = None
    health_check_period_s: float | None = None
    health_check_timeout_s: float | None = None
    graceful_shutdown_timeout_s: float | None = None
    graceful_shutdown_wait_loop_s: float | None = None
    placement_group_bundles: list[dict[str, float]] | None = None
    placement_group_strategy: str | None = None
    request_router_config: dict[str, Any] | None = None
    logging_config: dict[str, Any] | None = None

    @field_validator("autoscaling_config")
    @classmethod
    def _autoscaling_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from ray.serve.config import AutoscalingConfig  # Ray's own checks, which its schema skips

            AutoscalingConfig(**value)
        return value


class ApplicationConfig(_Strict):
    name: str = "gateway"
    route_prefix: str = "/"
    import_path: str = "app.deployments.builder:build_app"
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    args: GatewayConfig
    deployments: list[DeploymentOverride] = Field(default_factory=list)

    @model_validator(mode="after")
    def _live_settings_servable(self) -> ApplicationConfig:
        # The ingress's user_config holds what changes in place (app/config/live.py): check it as it will
        # be applied, so `serve deploy` of a bad one is caught here rather than logged by every replica.
        for override in self.deployments:
            if override.name == "ingress" and override.user_config is not None:
                try:
                    change = LiveConfig.model_validate(override.user_config)
                except ValidationError as error:
                    raise ValueError(f"deployments.ingress.user_config:\n{describe(error)}") from None
                try:
                    applied(self.args, merged(live_state_of(self.args), change))
                except ConfigError as error:
                    raise ValueError(f"deployments.ingress.user_config:\n{error}") from None
        return self


class ServeConfigFile(_Strict):
    """A `serve run` / `serve deploy` file whose applications are gateways."""

    proxy_location: Literal["Disabled", "HeadOnly", "EveryNode"] = "EveryNode"
    http_options: HTTPOptionsConfig = Field(default_factory=HTTPOptionsConfig)
    grpc_options: dict[str, Any] | None = None
    logging_config: dict[str, Any] | None = None
    applications: list[ApplicationConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _listeners_apart(self) -> ServeConfigFile:
        ports: dict[int, str] = {}
        for application in self.applications:
            listen = application.args.ingress.listen
            if listen is None:
                continue
            if self.proxy_location != "Disabled" and listen.port == self.http_options.port:
                raise ValueError(
                    f"application {application.name!r} listens on port {listen.port}, which Serve's HTTP proxy "
                    "(http_options.port) takes too: set `proxy_location: Disabled` (the gateway's listener is "
                    "the fast path) or move one of them"
                )
            if listen.port in ports:
                raise ValueError(f"applications {ports[listen.port]!r} and {application.name!r} both listen on port "
                                 f"{listen.port}: give each its own ingress.listen.port")
            ports[listen.port] = application.name
        return self


def load_serve_config(path: str | Path) -> ServeConfigFile:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    try:
        return ServeConfigFile.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path}: invalid config:\n{describe(error)}") from None
