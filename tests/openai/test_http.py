"""The OpenAI HTTP surface, in-process over ASGI against simulated engines."""

import asyncio
import json

import httpx
import pytest

from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.server import create_app
from app.openai.errors import APIError

FAST = SimulatedEngineConfig(time_scale=0.01)
CHAT = {"model": "sim-llama", "messages": [{"role": "user", "content": "Hello there, how is the cache?"}]}


@pytest.fixture
async def client():
    app = create_app(FAST, max_model_len=512, max_body_bytes=4096)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http
    await app.state.engine.shutdown()


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


async def test_chat_completion_has_openai_shape_and_usage(client):
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8, "ignore_eos": True})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8


async def test_repeated_prompt_reports_cached_tokens(client):
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "the cache " * 40}], "max_tokens": 2}
    first = (await client.post("/v1/chat/completions", json=long_chat)).json()
    second = (await client.post("/v1/chat/completions", json=long_chat)).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % 16 == 0 and cached < second["usage"]["prompt_tokens"]


async def test_chat_stream_is_openai_sse_with_usage_last(client):
    body = {**CHAT, "max_tokens": 5, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text


async def test_stream_without_include_usage_has_no_usage_key(client):
    r = await client.post("/v1/completions", json={"model": "sim-llama", "prompt": "hi", "max_tokens": 3,
                                                    "stream": True})
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks and all("usage" not in c and c["object"] == "text_completion" for c in chunks)


async def test_completion_accepts_token_ids_and_stop_strings(client):
    r = await client.post("/v1/completions", json={"model": "sim-llama", "prompt": [1, 300, 301], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    # A stop string that any output contains ends generation with finish_reason "stop", excluded from text.
    r = await client.post("/v1/completions", json={"model": "sim-llama", "prompt": "hi", "max_tokens": 50,
                                                    "ignore_eos": True, "stop": [" ", "a", "e", "1", "2"]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert not any(s in choice["text"] for s in [" ", "a", "e", "1", "2"])


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": "sim-llama"}, 400, "messages"),
        ({**CHAT, "temperature": 5}, 400, "temperature"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({**CHAT, "max_tokens": 100_000}, 400, "max_tokens"),
        ({**CHAT, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
        ({**CHAT, "n": 0}, 400, "n"),
        ({**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
        ({**CHAT, "tools": []}, 400, "tools"),
        ({**CHAT, "tool_choice": "sometimes"}, 400, "tool_choice"),
        ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content"),
    ],
)
async def test_bad_requests_get_openai_errors_with_the_field(client, payload, status, param):
    r = await client.post("/v1/chat/completions", json=payload)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


async def test_context_length_errors_say_so(client):
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100_000})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 512" in r.json()["error"]["message"]


async def test_streaming_errors_before_generation_get_a_real_status(client):
    r = await client.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT["messages"], "stream": True})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_malformed_json_empty_and_non_object_bodies_are_400(client):
    for content in (b"{not json", b"", b"[1, 2]"):
        r = await client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, content
        assert r.json()["error"]["type"] == "invalid_request_error"


async def test_oversized_body_is_413(client):
    r = await client.post("/v1/chat/completions", json={**CHAT, "user": "x" * 10_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


async def test_unknown_routes_and_methods_are_openai_shaped(client):
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


async def test_models_health_and_vllm_metrics(client):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "sim-llama"
    assert (await client.get("/health")).status_code == 200
    await client.post("/v1/completions", json={"model": "sim-llama", "prompt": "hi", "max_tokens": 2})
    metrics = (await client.get("/metrics")).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:cache_config_info",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count"):
        assert name in metrics, name


async def test_admission_limit_answers_429_with_retry_after():
    from app.engines.simulated.engine import SimulatedEngine
    from app.openai.engine_serving import OpenAIServing, ServedModel
    from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer

    tokenizer = PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR)
    engine = SimulatedEngine(SimulatedEngineConfig(time_scale=1.0), tokenizer, model="m", max_model_len=4096)
    serving = OpenAIServing(
        [ServedModel("m", tokenizer, engine, max_model_len=4096, block_size=16)],
        max_inflight_requests=1, retry_after_s=2,
    )
    body = {"model": "m", "prompt": "hi", "max_tokens": 1000, "ignore_eos": True}
    stream = serving.stream("completions", body)
    await anext(stream)
    with pytest.raises(APIError) as raised:
        await serving.create("completions", body)
    assert raised.value.status_code == 429 and raised.value.headers() == {"Retry-After": "2"}
    await stream.aclose()
    # Closing the stream released the slot and aborted the engine request.
    assert engine.core.num_running == 0
    reply = await serving.create("completions", {**body, "max_tokens": 1})
    assert reply.usage.completion_tokens == 1
    await engine.shutdown()


async def test_closing_a_stream_aborts_the_engine_request():
    from app.engines.simulated.engine import SimulatedEngine
    from app.protocol.engine import EngineRequest, SamplingParams
    from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer

    engine = SimulatedEngine(SimulatedEngineConfig(), PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR),
                             model="m", max_model_len=4096)
    request = EngineRequest(request_id="r", model="m", prompt_token_ids=[1, 300, 301],
                            sampling=SamplingParams(max_tokens=2000, ignore_eos=True))
    outputs = engine.generate(request)
    await anext(outputs)
    assert engine.core.num_running == 1 and engine.core.cache.usage > 0
    await outputs.aclose()
    await asyncio.sleep(0)
    assert engine.core.num_running == 0 and engine.core.cache.usage == 0
    await engine.shutdown()
