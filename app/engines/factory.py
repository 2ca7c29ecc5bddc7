"""Makes the engine a model's config asks for."""

from __future__ import annotations

from app.engines.protocol import Engine
from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.engine import SimulatedEngine
from app.tokenizer import PromptTokenizer


def create_engine(
    config: SimulatedEngineConfig,
    tokenizer: PromptTokenizer,
    *,
    model: str,
    max_model_len: int,
    engine_id: str | None = None,
) -> Engine:
    if config.kind == "simulated":
        return SimulatedEngine(config, tokenizer, model=model, max_model_len=max_model_len, engine_id=engine_id)
    raise ValueError(f"unknown engine kind {config.kind!r}")
