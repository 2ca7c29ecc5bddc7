"""What changes while serving, without a restart: traffic splits and each model's LoRA adapters.

Serve restarts every replica when an application's `args` change (they are part of its code version),
so the settings meant to change in place live elsewhere: in the ingress deployment's `user_config`
(`serve deploy` of an edited file, or a RayService edit, calls `reconfigure` on the running replicas),
or in a handle call (`set_traffic`, `set_adapters`). Either way the change is checked against the
whole gateway config first and refused as a whole if anything in it cannot be served.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.config.gateway import AdapterConfig, ConfigError, GatewayConfig, describe
from app.router.traffic import TrafficSplit


class LiveConfig(BaseModel):
    """The ingress deployment's `user_config`, or a handle change: each section given replaces the one it is
    merged onto (for `user_config`, the `args`'; for a handle call, what is in force); a section left out
    keeps it."""

    model_config = ConfigDict(extra="forbid")

    traffic: dict[str, TrafficSplit] | None = Field(
        default=None, description="Every traffic split, as the config's `traffic` writes them.")
    adapters: dict[str, list[AdapterConfig]] | None = Field(
        default=None, description="By base model, its whole list of LoRA adapters; models not named keep theirs.")


class LiveState(BaseModel):
    """The settings in force on every ingress and engine replica of an application (the state actor keeps
    the latest)."""

    model_config = ConfigDict(extra="forbid")

    traffic: dict[str, TrafficSplit] = Field(default_factory=dict)
    adapters: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Base model -> adapter name -> the path its engines load it from.")


def live_state_of(config: GatewayConfig) -> LiveState:
    return LiveState(traffic=config.traffic, adapters={model.name: model.adapter_paths for model in config.models})


def digest(user_config: Any) -> str:
    """Identifies one `user_config` value: a replica started later with the same one does not undo changes
    made since by handle calls."""
    return hashlib.sha256(json.dumps(user_config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def merged(state: LiveState, change: LiveConfig) -> LiveState:
    """`state` with the sections `change` gives replaced."""
    adapters = dict(state.adapters)
    for model, listed in (change.adapters or {}).items():
        names = [a.name for a in listed]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            raise ConfigError(f"adapters of {model!r}: {twice!r} is listed twice")
        adapters[model] = {a.name: a.path for a in listed}
    return LiveState(traffic=state.traffic if change.traffic is None else change.traffic, adapters=adapters)


def applied(start: GatewayConfig, state: LiveState) -> GatewayConfig:
    """The gateway config with `state` in force, checked as a whole (adapter folders, names used twice,
    splits naming what is not served); raises ConfigError saying what is wrong."""
    models = {model.name: model for model in start.models}
    problems = []
    for name, adapters in state.adapters.items():
        model = models.get(name)
        if model is None:
            problems.append(f"adapters: no model named {name!r} (models: {', '.join(models)})")
        elif adapters != model.adapter_paths and not start.routing.ranks_at_gateway:
            problems.append(f"adapters of {name!r}: routing.policy {start.routing.policy} picks replicas inside "
                            "Serve's handle, which cannot tell which replicas have loaded an adapter added while "
                            "serving; use prefix_aware or round_robin, or list the adapters in `args`")
        elif adapters != model.adapter_paths and not model.adapters_changeable:
            problems.append(
                f"adapters of {name!r}: its engines cannot change adapters while serving ("
                + ("external servers load their own" if model.is_external else
                   "vLLM started without LoRA: set `enable_lora: true` on its engine, which needs a restart") + ")")
    if problems:
        raise ConfigError("\n".join(problems))
    raw = start.model_dump(mode="json")
    raw["traffic"] = {name: split.model_dump(mode="json") for name, split in state.traffic.items()}
    for section in raw["models"]:
        if section["name"] in state.adapters:
            section["adapters"] = [AdapterConfig.at(adapter, path).model_dump()
                                   for adapter, path in state.adapters[section["name"]].items()]
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as error:
        # The checks that matter here are the whole config's, whose errors have no key path.
        raise ConfigError(describe(error).replace("(top level): ", "").replace("Value error, ", "").strip()) from None
