"""Makes the engine a model's config asks for."""

from __future__ import annotations

from app.engines.protocol import Engine
from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.engine import SimulatedEngine
from app.engines.vllm.config import VLLMEngineConfig
from app.engines.vllm.process import EngineRole
from app.tokenizer import PromptTokenizer


def create_engine(
    config: SimulatedEngineConfig | VLLMEngineConfig,
    tokenizer: PromptTokenizer,
    *,
    model: str,
    max_model_len: int,
    engine_id: str | None = None,
    role: EngineRole = "mixed",
    host_ip: str = "127.0.0.1",
) -> Engine:
    if isinstance(config, SimulatedEngineConfig):
        return SimulatedEngine(config, tokenizer, model=model, max_model_len=max_model_len, engine_id=engine_id)
    if isinstance(config, VLLMEngineConfig):
        from app.engines.vllm.engine import VLLMServerEngine  # needs httpx and pyzmq, not the simulator

        return VLLMServerEngine(
            config, tokenizer, model=model, max_model_len=max_model_len, engine_id=engine_id, role=role, host_ip=host_ip
        )
    raise ValueError(f"unknown engine kind {getattr(config, 'kind', config)!r}")
