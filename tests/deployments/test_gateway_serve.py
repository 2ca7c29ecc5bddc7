"""The gateway on a real local Ray cluster and Serve HTTP proxy, over simulated engine replicas."""

import asyncio
import json

import httpx
import pytest
from openai import OpenAI
from ray import serve

from app.config import parse_gateway_config
from app.deployments.builder import build_gateway
from app.openai.errors import APIError
from tests.helpers import (
    BaseURL,
    listen_on_free_port,
    metric_value,
    start_local_serve,
    stop_local_serve,
    wait_for,
)

pytestmark = pytest.mark.serve

CHAT = {"model": "sim-llama", "messages": [{"role": "user", "content": "Hello, gateway."}]}


def gateway_args(**engine_deployment) -> dict:
    return {
        "models": [{
            "name": "sim-llama",
            "aliases": ["default"],
            "max_model_len": 2048,
            "engine": {"time_scale": 0.05},
            "deployment": {"num_replicas": 2, **engine_deployment},
        }],
        "ingress": {"max_body_bytes": 65536},
    }


@pytest.fixture(scope="module")
def apps():
    port = start_local_serve()
    main = gateway_args()
    main_listener = listen_on_free_port(main)
    serve.run(build_gateway(parse_gateway_config(main)), name="gateway", route_prefix="/")
    # A second app with one real-time engine replica and tiny queues, to reach overload on purpose.
    tight = gateway_args(num_replicas=1, max_ongoing_requests=2, max_queued_requests=1)
    tight["models"][0]["engine"]["time_scale"] = 1.0
    tight_listener = listen_on_free_port(tight)
    serve.run(build_gateway(parse_gateway_config(tight)), name="tight", route_prefix="/tight")
    proxy = f"http://127.0.0.1:{port}"
    try:
        yield {"listen": BaseURL(main_listener, tight=tight_listener),
               "proxy": BaseURL(proxy, tight=proxy + "/tight")}
    finally:
        stop_local_serve()


@pytest.fixture(params=["listen", "proxy"])
def gateway(apps, request):
    """Each test runs on both ways in: the gateway's own listener (the default) and Serve's proxy."""
    return apps[request.param]


def engine_stats(app: str = "gateway") -> dict[str, dict]:
    """Latest stats per engine replica (calls land on replicas at random, so ask several times)."""
    handle = serve.get_deployment_handle("engine-sim-llama", app_name=app)
    stats: dict[str, dict] = {}
    for _ in range(12):
        s = handle.stats.remote().result(timeout_s=10)
        stats[s.engine_id] = s.model_dump()
    return stats


def test_openai_client_chat_completion(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(**CHAT, max_tokens=8, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    assert reply.model == "sim-llama"


def test_openai_client_streams_with_usage(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        **CHAT, max_tokens=6, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_aliases_and_models_list(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    assert [(m.id, m.root) for m in client.models.list()] == [("sim-llama", "sim-llama"), ("default", "sim-llama")]
    reply = client.completions.create(model="default", prompt="hi", max_tokens=2)
    assert reply.model == "sim-llama"


def test_repeated_prompts_report_cached_tokens(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    shared = {"model": "sim-llama", "messages": [{"role": "user", "content": "the prefix cache " * 30}]}
    cached = [client.chat.completions.create(**shared, max_tokens=1).usage.prompt_tokens_details.cached_tokens
              for _ in range(5)]
    # Two replicas and five requests: some replica sees the prompt twice and serves it from cache.
    assert max(cached) > 0


def test_errors_through_serve_are_openai_shaped(gateway):
    r = httpx.post(gateway + "/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(gateway + "/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(gateway + "/v1/chat/completions", json={**CHAT, "max_tokens": 4096})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(gateway + "/v1/chat/completions", json={**CHAT, "user": "x" * 70_000})
    assert r.status_code == 413


def test_handle_api_for_batch_jobs(gateway):
    handle = serve.get_app_handle("gateway")
    replies = [handle.chat.remote({**CHAT, "max_tokens": 3, "ignore_eos": True}) for _ in range(4)]
    for reply in replies:
        body = reply.result(timeout_s=30)
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 3
    completion = handle.completions.remote({"model": "sim-llama", "prompt": "hi", "max_tokens": 2}).result()
    assert completion["object"] == "text_completion"

    async def stream() -> list[dict]:
        gen = handle.options(stream=True).chat_stream.remote({**CHAT, "max_tokens": 4, "ignore_eos": True})
        return [chunk async for chunk in gen]

    chunks = asyncio.run(stream())
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    with pytest.raises(APIError) as raised:
        handle.chat.remote({**CHAT, "model": "nope"}).result(timeout_s=30)
    assert raised.value.status_code == 404

    # The whole request surface, as over HTTP: a forced tool call, n choices, embeddings, the Responses API.
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"key": {"type": "string", "maxLength": 8}}, "required": ["key"]}}}
    forced = handle.chat.remote({**CHAT, "max_tokens": 100, "tools": [tool], "tool_choice": "required"}).result()
    (call,) = forced["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup" and "key" in json.loads(call["function"]["arguments"])
    assert len(handle.chat.remote({**CHAT, "n": 2, "max_tokens": 2}).result()["choices"]) == 2
    vectors = handle.embeddings.remote({"model": "sim-llama", "input": ["a cat", "a dog"]}).result(timeout_s=30)
    assert [e["index"] for e in vectors["data"]] == [0, 1]
    answer = handle.responses.remote({"model": "sim-llama", "input": "hi", "max_output_tokens": 3}).result()
    assert answer["object"] == "response" and answer["output"][0]["content"][0]["text"]

    tokens = handle.tokenize.remote({"model": "sim-llama", "prompt": "hi there"}).result(timeout_s=30)
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = handle.detokenize.remote({"model": "sim-llama", "tokens": tokens["tokens"]}).result(timeout_s=30)
    assert text["prompt"].endswith("hi there")


def test_client_disconnect_aborts_the_engine_request(gateway):
    # The real-time app: 1,900 tokens take about 11 s, far longer than this test waits.
    body = {**CHAT, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", gateway.tight + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()  # leaving a for-loop over it would close the connection early
        assert next(lines).startswith("data:")
        assert wait_for(lambda: sum(s["num_requests_running"] for s in engine_stats("tight").values()) == 1)
    # Client gone: the proxy cancels the ingress request, which cancels the engine stream.
    assert wait_for(lambda: all(s["num_requests_running"] == 0 and s["kv_cache_usage_perc"] == 0
                                for s in engine_stats("tight").values()), timeout_s=5)


def test_engine_replicas_publish_stats(gateway):
    stats = engine_stats()
    assert len(stats) == 2
    handle = serve.get_deployment_handle("engine-sim-llama", app_name="gateway")
    routing = handle.record_routing_stats.remote().result(timeout_s=10)
    assert {"num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
            "prefix_cache_queries", "prefix_cache_hits"} <= routing.keys()
    assert routing["cache_config"]["block_size"] == 16


def test_overload_gets_503_with_retry_after_and_nothing_hangs(gateway):
    body = {**CHAT, "max_tokens": 150, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *[client.post(gateway.tight + "/v1/chat/completions", json=body) for _ in range(6)]
            )

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    assert set(statuses) <= {200, 503}
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "engine_overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 150


def test_a_stream_the_engine_refuses_gets_the_status_not_a_200(gateway):
    # The engine refuses a tool_choice naming no tool before generating, so the client sees a 400.
    tool = {"type": "function", "function": {"name": "lookup"}}
    body = {**CHAT, "max_tokens": 4, "stream": True, "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "missing"}}}
    with httpx.stream("POST", gateway + "/v1/chat/completions", json=body, timeout=30) as response:
        response.read()
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"

    # Overload before the first token: a 503 with Retry-After, not a 200 with an error inside.
    slow = {**CHAT, "max_tokens": 150, "ignore_eos": True, "stream": True}

    async def burst() -> list[tuple[int, str | None]]:
        async with httpx.AsyncClient(timeout=60) as client:
            async def one() -> tuple[int, str | None]:
                async with client.stream("POST", gateway.tight + "/v1/chat/completions", json=slow) as r:
                    await r.aread()
                    return r.status_code, r.headers.get("retry-after")
            return await asyncio.gather(*[one() for _ in range(6)])

    outcomes = asyncio.run(burst())
    assert {status for status, _ in outcomes} == {200, 503}, outcomes
    assert all(retry == "1" for status, retry in outcomes if status == 503)


def test_gateway_metrics(gateway):
    httpx.post(gateway + "/v1/completions", json={"model": "sim-llama", "prompt": "hi", "max_tokens": 2})
    text = httpx.get(gateway + "/metrics").text
    assert metric_value(text, "gateway_requests_total") > 0
    assert 'status="200"' in text and 'status="404"' in text
    assert metric_value(text, "gateway_time_to_first_token_seconds_count") > 0
    assert metric_value(text, "gateway_e2e_request_latency_seconds_count") > 0
    assert json.loads(httpx.get(gateway + "/health").text) == {"status": "ok"}


def test_the_request_surface_streams_through_each_way_in(gateway):
    """n choices interleaved by index with logprobs and one usage chunk; a tool call's deltas; the
    Responses API's typed events: the same through the listener and through Serve's proxy."""
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        **CHAT, n=2, max_tokens=5, logprobs=True, top_logprobs=2, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    per_choice: dict[int, int] = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            per_choice[choice.index] = per_choice.get(choice.index, 0) + len((choice.logprobs.content or [])
                                                                               if choice.logprobs else [])
    assert per_choice == {0: 5, 1: 5}, "every token of both choices came with its logprobs"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices

    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"key": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
        "required": ["key", "n"]}}}
    stream = client.chat.completions.create(**CHAT, tools=[tool], tool_choice="required", max_tokens=100,
                                            stream=True)
    deltas = [d for c in stream if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "lookup"
    assert set(json.loads("".join(d.function.arguments or "" for d in deltas))) == {"key", "n"}

    events = list(client.responses.create(model="sim-llama", input="Hello", max_output_tokens=4, stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")  # EOS, or max_output_tokens
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output_text == text and 1 <= events[-1].response.usage.output_tokens <= 4
