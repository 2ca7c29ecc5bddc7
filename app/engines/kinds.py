"""Engine kinds by the name a model's `engine.kind` uses, and making the engine a replica runs.

Adding a kind: a folder with its config (a pydantic model with `kind: Literal["<name>"]`) and its engine
(app.protocol.engine.Engine), and one line in `KINDS`. Engines are imported only when a replica starts,
so a kind's dependencies (vLLM's client libraries) are not needed where it is not used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
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

    @property
    def runs_engines(self) -> bool:
        return self.engine is not None


KINDS: dict[str, EngineKind] = {
    "simulated": EngineKind(SimulatedEngineConfig, "app.engines.simulated.engine:SimulatedEngine"),
    "vllm": EngineKind(VLLMEngineConfig, "app.engines.vllm.engine:VLLMServerEngine"),
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
) -> Engine:
    kind = kind_of(config)
    if kind.engine is None:
        raise ValueError(f"engine kind {config.kind!r} is served by servers the gateway does not run")
    module, _, name = kind.engine.partition(":")
    engine_class = getattr(importlib.import_module(module), name)
    return engine_class(
        config, tokenizer, model=model, max_model_len=max_model_len, engine_id=engine_id, role=role, host_ip=host_ip
    )
