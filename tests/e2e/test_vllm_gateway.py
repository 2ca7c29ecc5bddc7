"""The gateway over two real vLLM CPU engines (2 mixed replicas), on the gateway's own listener."""

import random
import time

import httpx
import pytest
import ray
from openai import OpenAI
from ray import serve

from app.config import parse_gateway_config
from app.deployments.builder import build_gateway
from app.deployments.state_actor import NAMESPACE, actor_name
from tests.e2e.conftest import engine_processes, vllm_cpu_engine
from tests.helpers import free_port, metric_sample, start_local_serve, stop_local_serve, wait_for

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

MODEL = "tiny-llama"
WORDS = "river stone cloud maple engine harbor violet copper lantern meadow signal orbit".split()
LISTEN_PORT = free_port()  # every redeploy of the app keeps its listener here


def gateway_args(model_dir, policy: str) -> dict:
    return {
        "models": [{
            "name": MODEL,
            "max_model_len": 1024,
            "engine": vllm_cpu_engine(model_dir),
            "deployment": {"num_replicas": 2, "max_ongoing_requests": 64},
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
        wait_for(lambda: len(routing_state()["replicas"]) == 2, timeout_s=30)
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
    ]
    handle = serve.get_app_handle("gateway")
    actor = ray.get_actor(actor_name("gateway"), namespace=NAMESPACE)
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    for messages in conversations:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
        keys = handle.routing_keys.remote("chat", {"model": MODEL, "messages": messages}).result(timeout_s=30)
        assert len(keys) >= 3, "long enough for several full 32-token blocks"

        def stored(keys: list[int] = keys) -> int:
            return max(ray.get(actor.match.remote(keys), timeout=10).values(), default=0)

        # Every full block of the prompt, keyed as the gateway keys it, is one vLLM says it stored.
        assert wait_for(lambda: stored() == len(keys), timeout_s=15), (stored(), len(keys))  # noqa: B023


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
    assert wait_for(lambda: len(routing_state()["replicas"]) == 2, timeout_s=60)
    assert routing_state()["policy"] == "round_robin"
    round_robin = _hit_rate_of(gateway, "robin")
    print(f"vLLM prefix-cache hit rate: prefix_aware {ours:.3f}, round_robin {round_robin:.3f}")
    assert ours > round_robin + 0.1
