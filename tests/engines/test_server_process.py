"""`python -m app.engines.simulated --port N` as a separate process, driven by the official openai client."""

import asyncio

import httpx
import pytest
from openai import OpenAI

from app.engines.vllm.kv_events import KVEventSubscriber
from app.kv.hashing import get_hasher
from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer
from tests.helpers import SimServer, metric_value, wait_for


@pytest.fixture(scope="module")
def server_url():
    server = SimServer().start()
    try:
        yield server.url
    finally:
        server.stop()


def test_openai_client_chat_and_stream(server_url):
    client = OpenAI(base_url=server_url + "/v1", api_key="x")
    reply = client.chat.completions.create(
        model="sim-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 6 and reply.choices[0].message.content
    chunks = list(client.completions.create(model="sim-llama", prompt="hello", max_tokens=4, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_disconnect_mid_stream_frees_the_engine(server_url):
    body = {"model": "sim-llama", "prompt": "hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server_url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()  # keep the iterator: leaving a for-loop over it closes the connection
        assert next(lines).startswith("data:")
        running = metric_value(httpx.get(server_url + "/metrics").text, "vllm:num_requests_running")
        assert running == 1
    # The client is gone: the engine must stop generating and free the request.
    assert wait_for(lambda: metric_value(httpx.get(server_url + "/metrics").text,
                                         "vllm:num_requests_running") == 0, timeout_s=10)
    assert metric_value(httpx.get(server_url + "/metrics").text, "vllm:kv_cache_usage_perc") == 0


async def test_kv_events_are_published_over_zmq_like_vllm():
    # A router subscribed to this server (as to a real vLLM server) learns exactly the prompt's blocks.
    server = SimServer(kv_events=True).start(wait=False)
    subscriber = KVEventSubscriber(connect=server.kv_events)
    subscriber.start()
    try:
        url = server.url
        server.wait_ready()
        prompt = "the same long system prompt, block after block, " * 8
        async with httpx.AsyncClient(base_url=url) as client:
            # ZMQ drops what a PUB socket sends before the subscription reaches it: wait for one batch.
            for _ in range(100):
                await client.post("/v1/completions", json={"model": "sim-llama", "prompt": "warm up", "max_tokens": 1})
                await asyncio.sleep(0.1)
                if subscriber.take_kv_events():
                    break
            reply = await client.post("/v1/completions", json={"model": "sim-llama", "prompt": prompt,
                                                                 "max_tokens": 1})
            assert reply.status_code == 200
        tokens = PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR).encode(prompt)
        expected = get_hasher("sha256", "0").block_hashes(tokens, 16)
        assert len(expected) >= 4
        for _ in range(50):
            if set(expected) <= set(subscriber.cached_block_hashes()):
                break
            await asyncio.sleep(0.1)
        assert set(expected) <= set(subscriber.cached_block_hashes())
        assert subscriber.missed_batches == 0
    finally:
        await subscriber.close()
        server.stop()
