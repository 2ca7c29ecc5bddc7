"""LoRA adapters served by name: each adapter is a model of its own on its base model's engines, listed
with its parent, keyed apart from the base in the prefix cache, and run by the engine as that adapter."""

import contextlib
from dataclasses import replace

import httpx
import pytest
from openai import AsyncOpenAI, NotFoundError

from app.api.asgi import GatewayASGI
from app.api.gateway_serving import GatewayServing
from app.config import parse_gateway_config
from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.server import create_app
from app.gateway.client_builder import ClientBuilder, ModelPlan, Reach
from app.gateway.routed import HTTPTransport
from app.kv.hashing import get_hasher
from app.openai.prepare import ServedModel
from app.router.scheduler import Scheduler
from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer
from app.upstream import UpstreamPool
from tests.gateway.servers import fleet, serving

ADAPTERS = {"sql-lora": "sim://sql-lora", "chat-lora": "sim://chat-lora"}
PROMPT = "Translate the question into a query: how many users signed up last week?"


@contextlib.asynccontextmanager
async def gateway_with_adapters():
    engine_app = create_app(SimulatedEngineConfig(time_scale=0.01, max_loras=1), model="sim-llama",
                            max_model_len=1024, adapters=ADAPTERS)
    async with serving(engine_app) as url:
        state = fleet(("e", url, "mixed"), model="sim-llama", node_id="here")
        client = ClientBuilder(Scheduler(state)).build(ModelPlan("sim-llama", 16),
                                                       Reach(http=HTTPTransport(UpstreamPool()), node_id="here"))
        base = ServedModel("sim-llama", PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR), client, max_model_len=1024,
                           block_size=16, hasher=get_hasher())
        models = [base, *(replace(base, name=name, adapter_of="sim-llama", adapter_path=path)
                          for name, path in ADAPTERS.items())]
        app = GatewayASGI(GatewayServing(models), max_body_bytes=1 << 20, metrics=lambda: b"")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0), \
                app, engine_app.state.engine
    await engine_app.state.engine.shutdown()


async def test_adapters_are_listed_with_their_base_and_served_by_name():
    async with gateway_with_adapters() as (client, _, engine):
        listed = {m.id: (m.parent, m.root) async for m in client.models.list()}
        assert listed == {"sim-llama": (None, "sim-llama"), "sql-lora": ("sim-llama", "sim://sql-lora"),
                          "chat-lora": ("sim-llama", "sim://chat-lora")}
        answers = {}
        for model in ("sim-llama", "sql-lora", "chat-lora"):
            reply = await client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                                    extra_body={"ignore_eos": True})
            assert reply.model == model
            answers[model] = reply.choices[0].text
        assert len(set(answers.values())) == 3, "each adapter answers differently from the base and each other"
        # The engine ran them as adapters: one slot, so the second evicted the first.
        assert engine.core.adapters.loaded == ["chat-lora"]
        assert (engine.core.adapters.loads, engine.core.adapters.evictions) == (2, 1)


async def test_an_adapters_prefix_keys_are_its_own():
    async with gateway_with_adapters() as (_, app, _):
        preparer = app.serving.preparer
        keys = {}
        for model in ("sim-llama", "sql-lora"):
            validated = preparer.validate("completions", {"model": model, "prompt": PROMPT * 4})
            keys[model] = (await preparer.prepare(validated)).engine_request.block_hashes
        assert keys["sim-llama"] and not set(keys["sim-llama"]) & set(keys["sql-lora"])
        request = (await preparer.prepare(preparer.validate("completions", {"model": "sql-lora", "prompt": "x"})))
        assert (request.engine_request.lora_name, request.engine_request.lora_path) == ("sql-lora", "sim://sql-lora")


async def test_an_unknown_adapter_is_a_404_listing_what_is_served():
    async with gateway_with_adapters() as (client, _, _):
        with pytest.raises(NotFoundError) as missing:
            await client.completions.create(model="nope-lora", prompt="hi", max_tokens=2)
        assert "sql-lora" in missing.value.body["message"]


def test_the_config_names_adapters_and_refuses_what_cannot_be_served(tmp_path):
    config = parse_gateway_config({"models": [{"name": "base", "adapters": [{"name": "a"}, {"name": "b"}]}]})
    assert config.models[0].adapter_paths == {"a": "sim://a", "b": "sim://b"}
    with pytest.raises(ValueError, match="used twice"):
        parse_gateway_config({"models": [{"name": "base", "adapters": [{"name": "a"}, {"name": "a"}]}]})
    with pytest.raises(ValueError, match="used twice"):
        parse_gateway_config({"models": [{"name": "base", "adapters": [{"name": "x"}]}, {"name": "x"}]})
    vllm = {"kind": "vllm", "model": str(tmp_path)}
    with pytest.raises(ValueError, match=r"no adapter_config\.json"):
        parse_gateway_config({"models": [{"name": "base", "engine": vllm,
                                          "adapters": [{"name": "a", "source": str(tmp_path / "missing")}]}]})
    with pytest.raises(ValueError, match="give its `source`"):
        parse_gateway_config({"models": [{"name": "base", "engine": vllm, "adapters": [{"name": "a"}]}]})
