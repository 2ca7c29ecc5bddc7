"""Engine kinds by the name a model's `engine.kind` uses, and making the engine a replica runs.

Adding a kind: a folder with its config (a pydantic model with `kind: Literal["<name>"]`) and its engine
(app.protocol.engine.Engine), and one line in `KINDS`. Engines are imported only when a replica starts,
so a kind's dependencies (vLLM's client libraries) are not needed where it is not used.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from app.engines.external.config import ExternalEngineConfig
from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.vllm.config import VLLMEngineConfig
from app.protocol.engine import Engine, EngineRole
from app.tokenizer import PromptTokenizer


@dataclass(frozen=True, slots=True)
class EngineKind:
    config: type[BaseModel]
    engine: str | None
    """"module:Class" of the engine a replica runs; None for servers the gateway reaches but does not run."""
    ignored_fields: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    """Request fields this kind's servers accept and then ignore: field -> (the one value that means
    nothing, why). The gateway refuses other values with a 400 naming the field, so no field is
    accepted and silently dropped."""

    @property
    def runs_engines(self) -> bool:
        return self.engine is not None


KINDS: dict[str, EngineKind] = {
    "simulated": EngineKind(SimulatedEngineConfig, "app.engines.simulated.engine:SimulatedEngine"),
    "vllm": EngineKind(VLLMEngineConfig, "app.engines.vllm.engine:VLLMServerEngine", ignored_fields={
        "best_of": (1, "vLLM's engine generates each choice once and has no best_of; ask for n choices instead"),
    }),
    "external": EngineKind(ExternalEngineConfig, None),
}


def kind_of(config: Any) -> EngineKind:
    return KINDS[config.kind]


def create_engine(
    config: Any,
    tokenizer: PromptTokenizer,
    *,
    model: str,
    max_model_len: int,
    engine_id: str | None = None,
    role: EngineRole = "mixed",
    host_ip: str = "127.0.0.1",
    adapters: Mapping[str, str] | None = None,
) -> Engine:
    kind = kind_of(config)
    if kind.engine is None:
        raise ValueError(f"engine kind {config.kind!r} is served by servers the gateway does not run")
    module, _, name = kind.engine.partition(":")
    engine_class = getattr(importlib.import_module(module), name)
    return engine_class(config, tokenizer, model=model, max_model_len=max_model_len, engine_id=engine_id, role=role,
                        host_ip=host_ip, adapters=adapters or {})
