"""The gateway's configuration: the application's `args` (`gateway`), a whole Serve config file
(`serve_file`), and the `check` command (`python -m app.config check FILE`)."""

from app.config.cli import main
from app.config.gateway import (
    ClusterStateConfig,
    ConfigError,
    DisaggregationConfig,
    EngineDeploymentConfig,
    EngineGroupConfig,
    GatewayConfig,
    IngressConfig,
    ListenConfig,
    ModelConfig,
    parse_gateway_config,
)
from app.config.serve_file import ServeConfigFile, load_serve_config

__all__ = [
    "ClusterStateConfig", "ConfigError", "DisaggregationConfig", "EngineDeploymentConfig", "EngineGroupConfig",
    "GatewayConfig", "IngressConfig", "ListenConfig", "ModelConfig", "ServeConfigFile", "load_serve_config", "main",
    "parse_gateway_config",
]
