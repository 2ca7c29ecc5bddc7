"""`python -m app.engines.simulated --port N` as a separate process, driven by the official openai client."""

import subprocess
import sys

import httpx
import pytest
from openai import OpenAI

from tests.helpers import free_port, metric_value, wait_for, wait_until_ready


@pytest.fixture(scope="module")
def server_url():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app.engines.simulated", "--port", str(port), "--time-scale", "0.05"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url + "/health", timeout_s=60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


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
