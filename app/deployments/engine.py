"""The engine deployment: one engine per replica, reached through Serve handles.

Outputs stream back as the engine produces them; the engine already merges whatever the reader has
not collected, so a busy stream sends fewer, larger messages instead of one Ray message per token.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from app.config import ModelConfig
from app.engines.factory import create_engine
from app.engines.protocol import EngineOutput, EngineRequest, EngineStats
from app.tokenizer import PromptTokenizer


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, health_check_period_s=5)
class EngineServer:
    def __init__(self, model: dict[str, Any]) -> None:
        config = ModelConfig.model_validate(model)
        context = serve.get_replica_context()
        self.engine = create_engine(
            config.engine,
            PromptTokenizer.from_dir(config.tokenizer_dir),
            model=config.name,
            max_model_len=config.max_model_len,
            engine_id=context.replica_id.unique_id if context else None,
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        # Cancelling the caller's response (client gone) closes this generator, which aborts
        # the request in the engine and frees its KV blocks.
        async with contextlib.aclosing(self.engine.generate(request)) as outputs:
            async for output in outputs:
                yield output

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def record_routing_stats(self) -> dict[str, Any]:
        """Published to Serve request routers (replica.routing_stats)."""
        return self.engine.stats().model_dump(mode="json")

    async def check_health(self) -> None:
        await self.engine.start()  # idempotent; makes the step loop run from the first check
        if not self.engine.healthy:
            raise RuntimeError("the engine's step loop has stopped")

    async def __del__(self) -> None:
        await self.engine.shutdown()
