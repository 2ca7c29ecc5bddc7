"""The routing config: a built-in policy, or a profile composed of named plugins with weights.

Built-in policies are profiles too (`builtin_profile`): `prefix_aware` is two filters, three scorers
priced in seconds of TTFT and the lowest-cost picker; `round_robin` and `power_of_two` are a picker
alone. A composed profile names plugins from app/router/plugins/registry.py; an unknown plugin or
parameter is refused when the config is read, naming what is known.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.router.cost import TTFTPrior
from app.router.plugins import registry

Policy = Literal["prefix_aware", "round_robin", "power_of_two", "ray_prefix_cache_affinity", "custom"]
POLICIES: tuple[str, ...] = ("prefix_aware", "round_robin", "power_of_two", "ray_prefix_cache_affinity", "custom")


class PluginSpec(BaseModel):
    """A plugin named in a config: its registered name and its parameters, checked against its `Params`."""

    model_config = ConfigDict(extra="forbid")
    _kind: ClassVar[str] = "plugin"

    type: str = Field(description="The plugin's registered name.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="The plugin's own settings.")

    @classmethod
    def _plugins(cls) -> dict[str, Any]:
        return registry.KINDS[cls._kind]

    @model_validator(mode="after")
    def _known(self) -> PluginSpec:
        table = self._plugins()
        plugin = table.get(self.type)
        if plugin is None:
            raise ValueError(f"unknown {self._kind} {self.type!r}; known {self._kind}s: {', '.join(sorted(table))}")
        try:
            plugin.Params.model_validate(self.parameters)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'parameters'}: {e['msg']}" for e in error.errors()
            )
            raise ValueError(f"{self._kind} {self.type!r} parameters: {problems}") from None
        return self


class FilterSpec(PluginSpec):
    _kind: ClassVar[str] = "filter"


class ScorerSpec(PluginSpec):
    _kind: ClassVar[str] = "scorer"

    weight: float = Field(
        default=1.0, ge=0, description="Multiplies the scorer's cost (for a normalised score: seconds per point)."
    )


class PickerSpec(PluginSpec):
    _kind: ClassVar[str] = "picker"

    type: str = "lowest_cost"


class RoutingProfile(BaseModel):
    """Filters in order, scorers summed with their weights, one picker (llm-d's EndpointPickerConfig shape)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="custom", description="How decisions are labelled in metrics.")
    filters: list[FilterSpec] = Field(default_factory=list)
    scorers: list[ScorerSpec] = Field(default_factory=list)
    picker: PickerSpec = Field(default_factory=PickerSpec)


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Policy = Field(
        default="prefix_aware",
        description="Replica choice for each request: a built-in profile, or `custom` with `profile`.",
    )
    profile: RoutingProfile | None = Field(
        default=None, description="A profile composed of named plugins (sets `policy` to `custom`)."
    )
    guard_load_ratio: float = Field(
        default=3.0, ge=1.0, description="A replica may carry at most this multiple of the least-loaded one's load..."
    )
    guard_load_slack: int = Field(
        default=16,
        ge=0,
        description="...plus this many requests. The guard is a backstop for a wrong cost model (a hot "
        "prefix, a stale fit), not the load balancer: each request it moves recomputes its whole prefix, "
        "so a tight guard turns ordinary Poisson bursts into cache misses (benchmarks/README.md).",
    )
    saturated_kv_usage: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="KV usage at which a replica with a queue is skipped while others are not. At 1.0 only "
        "a replica with every block in use is skipped: a lower threshold sends requests away from the "
        "replicas that hold their prefix whenever caches run full, which is exactly when misses hurt most "
        "(measured in benchmarks/README.md); the cost model already prices the queue.",
    )
    affinity_weight: float = Field(
        default=1.0,
        ge=0,
        description="Extra cost, as a fraction of their prefill time, for the prefix tokens a replica would "
        "have to duplicate from the best holder: 1 prices the duplicate at the compute it wastes (and the "
        "copy evicts something else there).",
    )
    miss_externality: float = Field(
        default=1.0,
        ge=0,
        description="Weight of the delay a request's uncached prefill imposes on the requests already "
        "on a replica (their count x its prefill time). 0 ranks by the request's own TTFT alone.",
    )
    tie_quantum_s: float = Field(default=0.001, ge=0, description="Predicted TTFTs this close count as equal.")
    speculative_ttl_s: float = Field(default=5.0, gt=0, description="How long a routing-time guess stays.")
    stale_after_s: float = Field(default=2.0, gt=0, description="Cluster state older than this is ignored.")
    ttft_prior: TTFTPrior = Field(default_factory=TTFTPrior)
    seed: int = 0

    @model_validator(mode="after")
    def _policy_matches_profile(self) -> RoutingConfig:
        if self.profile is not None and self.policy != "custom":
            if "policy" in self.model_fields_set:
                raise ValueError(f"routing.profile composes a policy of its own: leave out `policy: {self.policy}` "
                                 "(or set it to custom)")
            self.policy = "custom"
        if self.policy == "custom" and self.profile is None:
            raise ValueError("routing.policy custom needs routing.profile (filters, scorers and a picker)")
        return self

    @property
    def ranks_at_gateway(self) -> bool:
        """Whether the gateway's scheduler ranks replicas (Ray's router and Serve's pick rank inside the handle)."""
        return self.policy not in ("power_of_two", "ray_prefix_cache_affinity")

    def effective_profile(self) -> RoutingProfile:
        return self.profile if self.profile is not None else builtin_profile(self)


def builtin_profile(config: RoutingConfig) -> RoutingProfile:
    """The built-in policies as plugin profiles, parameterised by the config's top-level settings."""
    if config.policy == "round_robin":
        return RoutingProfile(name="round_robin", picker=PickerSpec(type="round_robin"))
    if config.policy in ("power_of_two", "ray_prefix_cache_affinity"):
        # Ray's router ranks inside Serve's handle; the gateway's own ranking for it (the split, the
        # handle fallback) is Serve's default pick.
        return RoutingProfile(name="power_of_two", picker=PickerSpec(type="power_of_two"))
    return RoutingProfile(
        name="prefix_aware",
        filters=[
            FilterSpec(type="kv_saturation", parameters={"saturated_kv_usage": config.saturated_kv_usage}),
            FilterSpec(type="load_guard", parameters={"load_ratio": config.guard_load_ratio,
                                                      "load_slack": config.guard_load_slack}),
        ],
        scorers=[
            ScorerSpec(type="predicted_ttft", weight=1.0),
            ScorerSpec(type="miss_externality", weight=config.miss_externality),
            ScorerSpec(type="prefix_duplication", weight=config.affinity_weight),
            ScorerSpec(type="adapter_affinity", weight=1.0),  # zero for requests without an adapter
        ],
        picker=PickerSpec(type="lowest_cost", parameters={"tie_quantum_s": config.tie_quantum_s}),
    )
