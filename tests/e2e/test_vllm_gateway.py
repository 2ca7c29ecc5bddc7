"""The gateway over two real vLLM CPU engines (2 mixed replicas), on the gateway's own listener."""

import json
import random
import time

import httpx
import jsonschema
import pytest
import ray
from openai import OpenAI
from ray import serve

from app.config import parse_gateway_config
from app.deployments.builder import build_gateway
from app.deployments.state_actor import NAMESPACE, actor_name
from tests.e2e.conftest import TOOLS_AND_JSON_ARGS, WEATHER, engine_processes, vllm_cpu_engine
from tests.helpers import free_port, metric_sample, start_local_serve, stop_local_serve, wait_for

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

MODEL = "tiny-llama"
EMBED_MODEL = "tiny-embed"
WORDS = "river stone cloud maple engine harbor violet copper lantern meadow signal orbit".split()
LISTEN_PORT = free_port()  # every redeploy of the app keeps its listener here
WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                                   "parameters": WEATHER}}]
WEATHER_CHAT = [{"role": "user", "content": "What is the weather by the harbor?"}]


def gateway_args(model_dir, policy: str) -> dict:
    return {
        "models": [{
            "name": MODEL,
            "max_model_len": 1024,
            "engine": vllm_cpu_engine(model_dir, extra_args=TOOLS_AND_JSON_ARGS),
            "deployment": {"num_replicas": 2, "max_ongoing_requests": 64},
        }, {
            # The same weights as an embedding model: vLLM's pooling runner, last-token pooling.
            "name": EMBED_MODEL,
            "max_model_len": 1024,
            "engine": vllm_cpu_engine(model_dir, extra_args=["--runner", "pooling", "--convert", "embed"]),
            "deployment": {"num_replicas": 1},
        }],
        "routing": {"policy": policy},
        "ingress": {"listen": {"host": "127.0.0.1", "port": LISTEN_PORT}},
    }


def deploy(model_dir, policy: str) -> None:
    serve.run(build_gateway(parse_gateway_config(gateway_args(model_dir, policy))), name="gateway", route_prefix="/")


@pytest.fixture(scope="module")
def gateway(tiny_model):
    start_local_serve()
    try:
        deploy(tiny_model, "prefix_aware")
        url = f"http://127.0.0.1:{LISTEN_PORT}"
        wait_for(lambda: len(routing_state()["replicas"]) == 3, timeout_s=30)
        yield url
    finally:
        stop_local_serve()
        # Every vLLM process (API server, engine core, worker, supervisor) must be gone.
        assert wait_for(lambda: not engine_processes(), timeout_s=30), engine_processes()


def routing_state() -> dict:
    return serve.get_app_handle("gateway").routing_state.remote().result(timeout_s=30)


def engine_counters() -> dict[str, tuple[int, int]]:
    """vLLM's own prefix-cache counters per replica: (vllm:prefix_cache_hits, vllm:prefix_cache_queries)."""
    replicas = routing_state()["replicas"]
    return {
        rid: (r["engine_stats"]["prefix_cache_hits"], r["engine_stats"]["prefix_cache_queries"])
        for rid, r in replicas.items()
    }


def system_prompt(group: int, salt: str) -> str:
    rng = random.Random(f"{salt}-{group}")
    return f"{salt} group {group}: " + " ".join(rng.choice(WORDS) for _ in range(160))


def test_openai_client_streams_from_real_vllm(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about rivers."}], max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces)
    assert len(pieces) > 2, "tokens arrive as a stream, not in one piece"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens > 5
    # The ingress streamed from the vLLM server itself, not through the engine replica.
    metrics = httpx.get(gateway + "/metrics").text
    assert metric_sample(metrics, "gateway_engine_streams_total", path="direct") >= 1
    assert metric_sample(metrics, "gateway_engine_streams_total", path="serve") == 0


def test_repeated_prompt_is_served_from_cache_with_logprobs(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": system_prompt(0, "cache-test")}, {"role": "user", "content": "hi"}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    second = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert first.choices[0].message.content == second.choices[0].message.content
    prompt_tokens = first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= (prompt_tokens // 32 - 1) * 32 > 0
    content = second.choices[0].logprobs.content
    assert len(content) == 6
    assert all(entry.logprob <= 0 and len(entry.top_logprobs) == 2 for entry in content)
    assert [e.logprob for e in content] == pytest.approx([e.logprob for e in first.choices[0].logprobs.content])


def test_stop_strings_end_the_answer(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    prompt = "Once upon a time in a quiet harbor"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 :][:3]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_errors_from_vllm_are_openai_errors(gateway):
    r = httpx.post(gateway + "/v1/completions", json={"model": MODEL, "prompt": "x" * 10, "max_tokens": 5000})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_kv_events_from_vllm_fill_the_router_index(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    client.completions.create(model=MODEL, prompt=system_prompt(1, "events"), max_tokens=1)
    assert wait_for(lambda: sum(r["blocks"] for r in routing_state()["replicas"].values()) > 0, timeout_s=10)


def test_the_gateways_keys_for_chats_are_the_blocks_vllm_stores(gateway):
    """Tokenize to route, forward to serve: vLLM renders and tokenizes the chat it is sent, and the blocks
    it reports storing (its KV events, in the state actor's index) are exactly the gateway's keys."""
    system = system_prompt(2, "keys")
    conversations = [
        [{"role": "system", "content": system}, {"role": "user", "content": "What is the harbor like?"}],
        [{"role": "system", "content": system}, {"role": "user", "content": "Describe the meadow."},
         {"role": "assistant", "content": " ".join(WORDS * 4)},
         {"role": "user", "content": "And the lantern by the river?"}],
        [{"role": "user", "content": " ".join(WORDS * 12)}],
        # Content parts of text: vLLM joins them with newlines, as the gateway does.
        [{"role": "system", "content": system}, {"role": "user", "content": [
            {"type": "text", "text": "First part."}, {"type": "text", "text": " ".join(WORDS * 3)}]}],
    ]
    tool_chats = [
        # Tool definitions: the template renders them (tojson, vLLM's field order and nulls) into the prompt.
        [{"role": "system", "content": system}, {"role": "user", "content": "Weather by the harbor?"}],
    ]
    handle = serve.get_app_handle("gateway")
    actor = ray.get_actor(actor_name("gateway"), namespace=NAMESPACE)
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    requests = [{"messages": m} for m in conversations] + [{"messages": m, "tools": WEATHER_TOOLS} for m in tool_chats]
    for request in requests:
        client.chat.completions.create(model=MODEL, max_tokens=1, **request)
        keys = handle.routing_keys.remote("chat", {"model": MODEL, **request}).result(timeout_s=30)
        assert len(keys) >= 3, "long enough for several full 32-token blocks"

        def stored(keys: list[int] = keys) -> int:
            return max(ray.get(actor.match.remote(keys), timeout=10).values(), default=0)

        # Every full block of the prompt, keyed as the gateway keys it, is one vLLM says it stored.
        assert wait_for(lambda: stored() == len(keys), timeout_s=15), (stored(), len(keys))  # noqa: B023


def test_json_schema_answers_validate_streamed_or_not(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    reply = client.chat.completions.create(model=MODEL, messages=WEATHER_CHAT, max_tokens=300, temperature=0,
                                           response_format=response_format)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), WEATHER)
    stream = client.chat.completions.create(model=MODEL, messages=WEATHER_CHAT, max_tokens=300, temperature=0.8,
                                            response_format=response_format, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), WEATHER)


def test_required_tool_choice_calls_the_function_with_valid_arguments(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=WEATHER_CHAT, tools=WEATHER_TOOLS,
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=300,
                                           temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    stream = client.chat.completions.create(model=MODEL, messages=WEATHER_CHAT, tools=WEATHER_TOOLS,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=300, temperature=0, stream=True)
    deltas = [d for c in stream if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather"
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), WEATHER)


def test_n_choices_and_top_logprobs(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=WEATHER_CHAT, n=3, max_tokens=4, temperature=1.0,
                                           logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == 12
    for choice in reply.choices:
        assert len(choice.logprobs.content) == 4
        assert all(len(entry.top_logprobs) == 3 for entry in choice.logprobs.content)
    stream = client.chat.completions.create(model=MODEL, messages=WEATHER_CHAT, n=3, max_tokens=4, temperature=1.0,
                                            stream=True, extra_body={"ignore_eos": True})
    assert {choice.index for chunk in stream for choice in chunk.choices} == {0, 1, 2}


def test_presence_penalty_changes_the_greedy_answer(gateway):
    """The penalty acts only once a greedy answer would repeat a token, so a few answers are compared."""
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)

    def answer(topic: str, **extra) -> str:
        messages = [{"role": "user", "content": f"Tell me about the {topic}"}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, temperature=0,
                                              extra_body={"ignore_eos": True}, **extra).choices[0].message.content

    topics = ["harbor and the lantern", "meadow", "copper engine", "violet orbit"]
    plain = [answer(topic) for topic in topics]
    assert [answer(topic) for topic in topics] == plain, "greedy answers repeat"
    assert [answer(topic, presence_penalty=2.0) for topic in topics] != plain, "the penalty reached vLLM"


def test_completion_echo_returns_the_prompt_first(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, echo=True, logprobs=1,
                                      temperature=0)
    choice = reply.choices[0]
    assert choice.text.startswith("Once upon a time")
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) > 3
    batch = client.completions.create(model=MODEL, prompt=["Once upon a time", "In a harbor"], max_tokens=2)
    assert [c.index for c in batch.choices] == [0, 1]


def test_embeddings_from_a_vllm_pooling_model(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    reply = client.embeddings.create(model=EMBED_MODEL, input=["the harbor at night", "a copper lantern"])
    assert [e.index for e in reply.data] == [0, 1]
    first, second = (e.embedding for e in reply.data)
    assert len(first) == len(second) > 0 and first != second
    assert reply.usage.prompt_tokens > 0
    again = client.embeddings.create(model=EMBED_MODEL, input="the harbor at night", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(first, abs=1e-4)
    # An embedding model has no chat: a 400 that says so, not a 503 after trying every replica.
    r = httpx.post(gateway + "/v1/chat/completions", json={"model": EMBED_MODEL, "messages": WEATHER_CHAT})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_responses_api_through_the_gateway(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    reply = client.responses.create(model=MODEL, input="Tell me about the harbor", instructions="Be brief",
                                    max_output_tokens=5, store=False)
    assert reply.model == MODEL and reply.output_text and reply.usage.output_tokens == 5
    events = list(client.responses.create(model=MODEL, input="Tell me about the harbor", max_output_tokens=5,
                                          stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and events[-1].type in ("response.completed", "response.incomplete")


def test_best_of_is_refused_rather_than_ignored(gateway):
    r = httpx.post(gateway + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "best_of": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_client_disconnect_aborts_the_request_in_vllm(gateway):
    body = {"model": MODEL, "prompt": "Count forever:", "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", gateway + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        running = lambda: sum(  # noqa: E731
            r["engine_stats"]["num_requests_running"] for r in routing_state()["replicas"].values()
        )
        assert wait_for(lambda: running() == 1, timeout_s=10)
    # The stream is closed well before 900 tokens; vLLM must stop generating, not run to the end.
    assert wait_for(lambda: running() == 0, timeout_s=10)


def _hit_rate_of(gateway: str, salt: str) -> float:
    """Shared-prefix chat traffic (8 system prompts x 4 users, shuffled); vLLM's own hit rate over it."""
    before = engine_counters()
    order = [(group, user) for group in range(8) for user in range(4)]
    random.Random(7).shuffle(order)
    with httpx.Client(timeout=120) as http:
        for group, user in order:
            r = http.post(gateway + "/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "system", "content": system_prompt(group, salt)},
                             {"role": "user", "content": f"user {user} asks"}],
            })
            assert r.status_code == 200, r.text
    time.sleep(1.0)  # the engines' counters reach the router through the state actor
    after = engine_counters()
    hits = sum(after[rid][0] - before.get(rid, (0, 0))[0] for rid in after)
    queries = sum(after[rid][1] - before.get(rid, (0, 0))[1] for rid in after)
    assert queries > 0
    return hits / queries


def test_prefix_aware_routing_beats_round_robin_on_vllm_hit_rate(gateway, tiny_model):
    # Last in this module: it leaves the app on round-robin. Fresh prefixes for each policy.
    ours = _hit_rate_of(gateway, "aware")
    deploy(tiny_model, "round_robin")
    assert wait_for(lambda: len(routing_state()["replicas"]) == 3, timeout_s=60)
    assert routing_state()["policy"] == "round_robin"
    round_robin = _hit_rate_of(gateway, "robin")
    print(f"vLLM prefix-cache hit rate: prefix_aware {ours:.3f}, round_robin {round_robin:.3f}")
    assert ours > round_robin + 0.1
