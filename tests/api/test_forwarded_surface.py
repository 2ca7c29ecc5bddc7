"""The gateway forwards the client's whole request: every field reaches the engine as sent, and what the
engine behind a model cannot do is refused by that engine, with a 400 naming the field."""

import httpx
import pytest

from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.server import create_app
from tests.api.test_request_reading import gateway_app

MESSAGES = [{"role": "user", "content": "Hello there"}]
# Fields OpenAI's and vLLM's chat API take that change sampling; the simulator ignores them, vLLM honours them.
SAMPLING = {
    "presence_penalty": 0.5, "frequency_penalty": 0.25, "logit_bias": {"17": -100}, "top_k": 5, "min_p": 0.1,
    "repetition_penalty": 1.1, "min_tokens": 1, "user": "tenant-7", "seed": 11, "stop": ["\n\n"],
    "temperature": 0.7, "top_p": 0.9, "max_completion_tokens": 3, "parallel_tool_calls": False,
    "structured_outputs": {"regex": "[a-z]+"}, "skip_special_tokens": True,
}


@pytest.fixture
async def through_gateway():
    engine_app = create_app(SimulatedEngineConfig(time_scale=0.01), model="sim-llama", max_model_len=512)
    async with gateway_app(engine_app) as app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                                 base_url="http://test") as client:
        client.gateway = app
        yield client, engine_app.state.http.received


def fallbacks(client, reason: str) -> float:
    return client.gateway.serving.metrics.key_fallbacks.labels("sim-llama", reason)._value.get()


async def test_every_field_reaches_the_engine_as_sent(through_gateway):
    client, received = through_gateway
    r = await client.post("/v1/chat/completions", json={"model": "sim-llama", "messages": MESSAGES, **SAMPLING})
    assert r.status_code == 200, r.text
    sent = received[-1]
    assert {key: sent.get(key) for key in SAMPLING} == SAMPLING
    assert sent["messages"] == MESSAGES


async def test_completions_fields_reach_the_engine_as_sent(through_gateway):
    client, received = through_gateway
    fields = {"presence_penalty": 1.0, "frequency_penalty": 0.5, "top_k": 3, "min_p": 0.05, "seed": 3,
              "user": "u", "logit_bias": {"5": 1}, "max_tokens": 2}
    r = await client.post("/v1/completions", json={"model": "sim-llama", "prompt": "Once", **fields})
    assert r.status_code == 200, r.text
    assert {key: received[-1].get(key) for key in fields} == fields


@pytest.mark.parametrize(("extra", "param"), [
    ({"suffix": "the end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
])
async def test_what_the_engine_cannot_do_it_refuses_naming_the_field(through_gateway, extra, param):
    client, received = through_gateway
    r = await client.post("/v1/completions", json={"model": "sim-llama", "prompt": "Once", **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    # The gateway did not refuse it: the engine got it and said no.
    assert received[-1][param] == extra[param]


async def test_a_prompt_the_gateway_cannot_render_is_routed_on_load_and_counted(through_gateway):
    client, received = through_gateway
    parts = [{"type": "text", "text": "What is here?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    r = await client.post("/v1/chat/completions", json={"model": "sim-llama", "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": parts}]})
    # The simulated engine takes text only, and says so; the request reached it whole.
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
    assert received[-1]["messages"][0]["content"] == parts
    conversation = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    r = await client.post("/v1/chat/completions", json={"model": "sim-llama", "messages": conversation,
                                                        "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert received[-1]["messages"] == conversation
    assert fallbacks(client, "content_parts") == 1 and fallbacks(client, "tool_messages") == 1


async def test_tool_definitions_alone_are_rendered_into_the_keys_not_a_fallback(through_gateway):
    client, _ = through_gateway
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    await client.post("/v1/chat/completions", json={"model": "sim-llama", "messages": MESSAGES, "tools": tools})
    assert fallbacks(client, "content_parts") == fallbacks(client, "tool_messages") == 0
