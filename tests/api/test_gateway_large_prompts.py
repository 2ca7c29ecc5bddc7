"""No request can stall the others: a huge prompt is refused from a bound on its length before it is
tokenized, and a long one that must be tokenized is tokenized off the event loop, so small requests
sent meanwhile are answered first. The gateway core in-process, the simulated server on loopback."""

import asyncio

import pytest

from app.api.gateway_serving import GatewayServing
from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.server import create_app
from app.openai.errors import APIError
from app.openai.prepare import ServedModel
from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer
from tests.gateway.servers import fleet, routed_client, serving

SMALL = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
async def gateway():
    app = create_app(SimulatedEngineConfig(time_scale=0.01), model="m", max_model_len=200_000)
    async with app.router.lifespan_context(app), serving(app) as url:
        tokenizer = PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR)
        model = ServedModel(name="m", tokenizer=tokenizer, engine=routed_client(fleet(("a", url, "mixed"))),
                            max_model_len=100_000, block_size=16)
        yield GatewayServing([model]), tokenizer


async def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing_it(gateway, monkeypatch):
    serving_, tokenizer = gateway

    def never(*args, **kwargs):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(tokenizer._tokenizer, "encode", never)
    monkeypatch.setattr(tokenizer._tokenizer, "encode_batch", never)
    huge = "word " * 1_500_000  # 7.5 MB: at least 300,000 tokens whatever they are
    with pytest.raises(APIError) as refused:
        await serving_.open("chat", {**SMALL, "messages": [{"role": "user", "content": huge}]})
    assert refused.value.status_code == 400 and refused.value.code == "context_length_exceeded"
    assert "at least" in refused.value.message


async def test_small_requests_are_answered_while_a_long_prompt_is_tokenized(gateway):
    serving_, _ = gateway
    # Within the bound (so it must be tokenized: a few seconds of work) but over the context once it is.
    long_prompt = "alpha beta gamma delta " * 60_000
    order: list[str] = []

    async def long() -> None:
        with pytest.raises(APIError) as refused:
            await serving_.open("chat", {**SMALL, "messages": [{"role": "user", "content": long_prompt}]})
        assert refused.value.code == "context_length_exceeded" and "at least" not in refused.value.message
        order.append("long refused")

    async def small() -> None:
        await asyncio.sleep(0.05)  # the long one is being tokenized by now
        for _ in range(3):
            await serving_.create("chat", SMALL)
        order.append("small answered")

    await asyncio.gather(long(), small())
    assert order == ["small answered", "long refused"]
