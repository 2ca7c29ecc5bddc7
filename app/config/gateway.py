"""The gateway's own configuration: the application's `args` (models and their engines, the ingress,
routing, the cluster-state actor), one strict pydantic model that rejects unknown keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from app.engines.external.config import ExternalEngineConfig
from app.engines.kinds import KINDS, kind_of
from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.vllm.config import VLLMEngineConfig
from app.router.admission.config import AdmissionStageSpec
from app.router.config import RoutingConfig
from app.router.traffic import TrafficSplit, check_splits
from app.tokenizer import BUILTIN_TOKENIZER_DIR


class ConfigError(ValueError):
    """A configuration that cannot work, with every problem listed by its key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _engine_kind(value: Any) -> str:
    # `kind` may be left out: an engine section without it is the simulator, as before vLLM existed.
    if isinstance(value, dict):
        return str(value.get("kind", "simulated"))
    return str(getattr(value, "kind", "simulated"))


_ENGINE_KINDS = tuple(KINDS)
# One member per registered kind (app/engines/kinds.py), told apart by `kind`.
EngineConfig = Annotated[
    Union[tuple(Annotated[kind.config, Tag(name)] for name, kind in KINDS.items())],  # type: ignore[valid-type]  # noqa: UP007
    Discriminator(_engine_kind),
]


class EngineDeploymentConfig(_Strict):
    """How one model's engine replicas run on Ray Serve."""

    num_replicas: int = Field(default=2, ge=0)
    max_ongoing_requests: int = Field(
        default=256, ge=1, description="Requests one replica takes at once; the engine queues beyond its batch."
    )
    max_queued_requests: int = Field(
        default=1024,
        ge=-1,
        description="Requests waiting in the caller's handle for a replica; beyond it callers get 503 "
        "(-1: unbounded).",
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 0},
        description="Ray actor options (num_cpus, num_gpus, memory, resources, accelerator_type, ...).",
    )
    health_check_period_s: float = Field(default=5.0, gt=0)


# Keys a role may not change: the router hashes prompts once per model, for every role alike.
_SHARED_ENGINE_KEYS = ("kind", "model", "block_size", "hash_algo", "hash_seed", "enable_prefix_caching")


class EngineGroupConfig(EngineDeploymentConfig):
    """One role's engine replicas: their own count, resources and placement, and engine settings."""

    num_replicas: int = Field(default=1, ge=1)
    engine_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Engine settings for this role only, over the model's `engine` (for example "
        "max_num_batched_tokens for prefill, max_num_seqs for decode).",
    )

    @field_validator("engine_overrides")
    @classmethod
    def _shared_keys_fixed(cls, value: dict[str, Any]) -> dict[str, Any]:
        fixed = sorted(set(value) & set(_SHARED_ENGINE_KEYS))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} must be the same for every role; set it in the model's engine")
        return value


class DisaggregationConfig(_Strict):
    """Prefill/decode split: prefill engines compute prompts, decode engines pull the KV cache and generate."""

    prefill: EngineGroupConfig = Field(default_factory=EngineGroupConfig)
    decode: EngineGroupConfig = Field(default_factory=EngineGroupConfig)
    min_split_tokens: int = Field(
        default=256,
        ge=0,
        description="Split only when the chosen decode replica would have to compute more than this many "
        "prompt tokens (its prefix cache holds the rest); shorter or mostly cached prompts go straight to it.",
    )
    prefill_timeout_s: float = Field(
        default=30.0, gt=0, description="A prefill slower than this is given up; the decode replica computes it."
    )


class AdapterConfig(_Strict):
    """A LoRA adapter of a base model, served under a model name of its own."""

    name: str = Field(min_length=1, description="The name clients put in `model` for this adapter.")
    source: str | None = Field(
        default=None,
        description="Where the engines read the adapter: a folder with adapter_config.json and "
        "adapter_model.safetensors on every engine node (vLLM). Simulated engines need none.",
    )

    @property
    def path(self) -> str:
        """The path the engines are given (and fold into their block hashes): `source`, or for a simulated
        engine's adapter without one, `sim://<name>`."""
        return self.source or f"sim://{self.name}"

    @classmethod
    def at(cls, name: str, path: str) -> AdapterConfig:
        """The adapter whose `path` this is."""
        return cls(name=name, source=None if path == f"sim://{name}" else path)


class ModelConfig(_Strict):
    """One served model: its names, tokenizer, engine and replicas."""

    name: str = Field(min_length=1, description="The name clients put in `model`.")
    aliases: list[str] = Field(default_factory=list, description="Other names that resolve to this model.")
    tokenizer: Path | None = Field(
        default=None,
        description="Folder with tokenizer.json (and tokenizer_config.json); default: a vLLM engine's model "
        "folder when it has one, else the built-in tokenizer. External servers without one are routed on "
        "approximate text keys and tokenize prompts themselves.",
    )
    max_model_len: int = Field(default=4096, ge=16, description="Context length: prompt plus completion.")
    engine: EngineConfig = Field(default_factory=SimulatedEngineConfig)
    deployment: EngineDeploymentConfig = Field(
        default_factory=EngineDeploymentConfig,
        description="The mixed engine replicas (no split). With `disaggregation`, 0 replicas is allowed.",
    )
    disaggregation: DisaggregationConfig | None = None
    adapters: list[AdapterConfig] = Field(
        default_factory=list,
        description="LoRA adapters on this model's engines, each addressable by its own name; engines load them "
        "into their slots on demand.",
    )

    @property
    def adapter_paths(self) -> dict[str, str]:
        """Adapter name -> the path the engines are given (and fold into their block hashes)."""
        return {a.name: a.path for a in self.adapters}

    @property
    def adapters_changeable(self) -> bool:
        """Whether adapters can be added and removed while serving: engines the gateway runs, with LoRA on
        (the simulator always; vLLM when it starts with adapters or `enable_lora`)."""
        if self.is_external:
            return False
        return bool(self.adapters) or getattr(self.engine, "enable_lora", True)

    @property
    def is_external(self) -> bool:
        """Served by OpenAI-compatible servers the gateway does not run (no engine replicas)."""
        return not kind_of(self.engine).runs_engines

    def engine_for(self, role: str) -> SimulatedEngineConfig | VLLMEngineConfig | ExternalEngineConfig:
        """The engine settings of one role: the model's engine with the role's overrides."""
        group = self.group(role)
        if not isinstance(group, EngineGroupConfig) or not group.engine_overrides:
            return self.engine
        return type(self.engine).model_validate({**self.engine.model_dump(), **group.engine_overrides})

    def group(self, role: str) -> EngineDeploymentConfig:
        if role == "mixed":
            return self.deployment
        if self.disaggregation is None:
            raise ValueError(f"model {self.name!r} has no {role} engines (no disaggregation section)")
        return self.disaggregation.prefill if role == "prefill" else self.disaggregation.decode

    @property
    def roles(self) -> list[str]:
        """The engine roles this model runs, each its own Serve deployment."""
        roles = ["mixed"] if self.deployment.num_replicas > 0 else []
        return roles + (["prefill", "decode"] if self.disaggregation is not None else [])

    @model_validator(mode="after")
    def _adapters_readable(self) -> ModelConfig:
        names = [a.name for a in self.adapters]
        duplicate = next((n for n in names if names.count(n) > 1 or n in (self.name, *self.aliases)), None)
        if duplicate is not None:
            raise ValueError(f"adapter name {duplicate!r} is used twice (adapters share the models' namespace)")
        if isinstance(self.engine, VLLMEngineConfig):
            for adapter in self.adapters:
                if adapter.source is None:
                    raise ValueError(f"adapter {adapter.name!r}: give its `source`, the folder vLLM loads it from")
                folder = Path(adapter.source).expanduser()
                if "://" not in adapter.source and not (folder / "adapter_config.json").is_file():
                    raise ValueError(f"adapter {adapter.name!r}: no adapter_config.json in {folder} (a PEFT LoRA "
                                     "folder with adapter_config.json and adapter_model.safetensors)")
        return self

    @model_validator(mode="after")
    def _has_engines(self) -> ModelConfig:
        if self.is_external:
            if self.disaggregation is not None:
                raise ValueError("disaggregation needs engines the gateway runs; external servers are routed "
                                 "as mixed replicas (remove `disaggregation`)")
            if self.deployment != EngineDeploymentConfig():
                raise ValueError("external servers are not Ray replicas: remove `deployment` (the servers "
                                 "are listed under engine.endpoints or found by engine.kubernetes)")
            return self
        if self.deployment.num_replicas == 0 and self.disaggregation is None:
            raise ValueError("deployment.num_replicas is 0 and there is no disaggregation: no engine would serve")
        if self.disaggregation is not None:
            for role in ("prefill", "decode"):
                try:
                    self.engine_for(role)  # overrides must make a valid engine config
                except ValidationError as error:
                    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
                    raise ValueError(f"disaggregation.{role}.engine_overrides: {problems}") from None
        return self

    @property
    def tokenizer_dir(self) -> Path | None:
        """None for external servers with no tokenizer configured: they tokenize for themselves."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.is_external:
            return None
        engine_tokenizer = getattr(self.engine, "tokenizer_dir", None)  # a kind that loads a model folder
        if engine_tokenizer is not None:
            return engine_tokenizer
        return BUILTIN_TOKENIZER_DIR

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in {value}")
        # Replicas may not start in the directory `serve run` ran in: pin the folder's path.
        return value.resolve() if value is not None else None


class ListenConfig(_Strict):
    """The gateway's own HTTP server, in every ingress replica: clients reach it with no proxy hop."""

    host: str = Field(
        default="127.0.0.1",
        description="127.0.0.1 for this machine only; 0.0.0.0 to take connections from others (a cluster, "
        "behind a TCP load balancer such as a Kubernetes Service).",
    )
    port: int = Field(
        default=8000, ge=1, le=65535,
        description="Every ingress replica on a node listens here (SO_REUSEPORT): the kernel spreads "
        "connections over them.",
    )
    keep_alive_s: float = Field(default=5.0, gt=0, description="Idle client connections are closed after this.")


class IngressConfig(_Strict):
    """The OpenAI ingress deployment."""

    listen: ListenConfig | None = Field(
        default_factory=ListenConfig,
        description="The gateway's own HTTP listener (the fast path). null: clients reach the gateway only "
        "through Serve's HTTP proxy (http_options) and Python handles.",
    )

    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=2048, ge=1)
    max_inflight_requests: int | None = Field(
        default=1024, ge=1, description="Per ingress replica; beyond it requests get 429 with Retry-After."
    )
    admission: list[AdmissionStageSpec] = Field(
        default_factory=list,
        description="Admission stages after the in-flight limit, in order (app/router/admission/registry.py); "
        "each sees the request and its model's fleet before any tokenizing.",
    )
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Larger bodies get 413.")
    retry_after_s: float = Field(default=1.0, gt=0, description="Retry-After sent with 429 and 503.")
    stream_from_engines: bool = Field(
        default=True,
        description="Send requests straight to an engine's own HTTP server when this ingress can reach it "
        "(every engine kind has one), instead of through the engine replica (a Ray hop per chunk).",
    )
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})


class ClusterStateConfig(_Strict):
    """The cluster-wide state actor and how often replicas talk to it."""

    report_interval_s: float = Field(
        default=0.1, gt=0,
        description="How often each engine replica (and each watcher of external servers) checks for new stats "
        "and KV events; it calls the actor only when there are some, or for a heartbeat.",
    )
    heartbeat_s: float = Field(
        default=1.0, gt=0, description="A replica with nothing new still reports this often (it stays a candidate)."
    )
    sync_interval_s: float = Field(
        default=0.2, gt=0,
        description="The least time between an ingress replica's syncs of its local snapshot (each also carries "
        "its routing-time guesses to the other ingress replicas). Until a sync confirms them, a router routes "
        "on its own guesses, so a longer interval costs little accuracy and saves control traffic.",
    )
    sync_wait_s: float = Field(
        default=1.0, ge=0,
        description="How long a sync waits at the actor for something new before answering empty (a long poll): "
        "news reaches routers at once, and an idle fleet costs one call a second per router.",
    )
    replica_timeout_s: float = Field(
        default=10.0, gt=0, description="A replica silent this long leaves the routing candidates."
    )

    @model_validator(mode="after")
    def _heartbeat_within_timeout(self) -> ClusterStateConfig:
        if self.heartbeat_s >= self.replica_timeout_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be below replica_timeout_s "
                             f"({self.replica_timeout_s}), or idle replicas would be dropped")
        return self
    max_log_ops: int = Field(
        default=50_000, ge=100, description="Index changes kept for incremental sync; a router further behind "
        "gets a full snapshot.",
    )


class GatewayConfig(_Strict):
    """The application's `args`: everything the gateway needs to build itself."""

    models: list[ModelConfig] = Field(min_length=1)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    cluster_state: ClusterStateConfig = Field(default_factory=ClusterStateConfig)
    traffic: dict[str, TrafficSplit] = Field(
        default_factory=dict,
        description="Names whose requests are split over weighted targets (models or adapters), e.g. "
        "`llama-prod: {targets: [{target: llama-v1, weight: 90}, {target: llama-v2, weight: 10}]}`. Changeable "
        "while serving: `set_traffic` on the app's handle.",
    )

    @property
    def served_names(self) -> list[str]:
        return [name for model in self.models for name in (model.name, *model.aliases, *model.adapter_paths)]

    @model_validator(mode="after")
    def _splits_servable(self) -> GatewayConfig:
        check_splits(self.traffic, self.served_names)
        return self

    @model_validator(mode="after")
    def _policy_fits_engines(self) -> GatewayConfig:
        external = [model.name for model in self.models if model.is_external]
        if external and self.routing.policy == "ray_prefix_cache_affinity":
            raise ValueError(f"routing.policy ray_prefix_cache_affinity picks inside Serve's handles, but "
                             f"{', '.join(external)} is served by external servers, which the gateway calls "
                             "directly: use prefix_aware, round_robin or power_of_two")
        return self

    @model_validator(mode="after")
    def _names_unique(self) -> GatewayConfig:
        seen: set[str] = set()
        for model in self.models:
            for name in (model.name, *model.aliases, *model.adapter_paths):
                if name in seen:
                    raise ValueError(f"model name or alias {name!r} is used twice")
                seen.add(name)
        return self


def describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        # Pydantic puts the union member's tag (`engine.vllm.x`) in the path; users wrote `engine.x`.
        parts = [str(part) for i, part in enumerate(item["loc"])
                 if not (i and item["loc"][i - 1] == "engine" and part in _ENGINE_KINDS)]
        where = ".".join(parts) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check its spelling and level)")
        else:
            lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def parse_gateway_config(args: Any) -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(args)
    except ValidationError as error:
        raise ConfigError(f"invalid gateway config (application args):\n{describe(error)}") from None
