"""Prefill/decode disaggregation on real vLLM CPU engines: 1 prefill + 1 decode, NIXL and shared storage.

The reference is a single mixed vLLM server of the same model in the same app: at temperature 0 a
split request must produce the same tokens and logprobs.
"""

import concurrent.futures
import json
import time

import httpx
import jsonschema
import pytest
import ray
from openai import OpenAI
from ray import serve

from app.config import parse_gateway_config
from app.deployments.builder import build_gateway
from tests.e2e.conftest import TOOLS_AND_JSON_ARGS, WEATHER, engine_processes, vllm_cpu_engine
from tests.helpers import free_port, metric_value, start_local_serve, stop_local_serve, wait_for

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

REFERENCE, SPLIT = "tiny-mixed", "tiny-split"
WORDS = "amber basil cedar delta ember fjord garnet hazel indigo juniper kelp lilac".split()
PROMPTS = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(150 + 17 * i)) for i in range(3)]
REFERENCE_ANSWERS: dict[str, tuple[str, list[float]]] = {}
LISTEN_PORT = free_port()  # every redeploy of the app keeps its listener here


def split_model(model_dir, connector: dict) -> dict:
    return {
        "name": SPLIT,
        "max_model_len": 1024,
        "engine": vllm_cpu_engine(model_dir, kv_transfer=connector, extra_args=TOOLS_AND_JSON_ARGS),
        "deployment": {"num_replicas": 0},
        "disaggregation": {"prefill": {"num_replicas": 1}, "decode": {"num_replicas": 1}, "min_split_tokens": 32},
    }


def deploy(models: list[dict]) -> None:
    args = {"models": models, "ingress": {"listen": {"host": "127.0.0.1", "port": LISTEN_PORT}}}
    serve.run(build_gateway(parse_gateway_config(args)), name="gateway", route_prefix="/")
    roles = sum(2 if m.get("disaggregation") else 1 for m in models)
    assert wait_for(lambda: len(routing_state()["replicas"]) == roles, timeout_s=60)


def routing_state() -> dict:
    return serve.get_app_handle("gateway").routing_state.remote().result(timeout_s=30)


def role_stats(role: str) -> dict:
    return next(r["engine_stats"] for r in routing_state()["replicas"].values() if r["role"] == role)


def paths(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {p: metric_value(text, f'gateway_disaggregation_requests_total{{model="{SPLIT}",path="{p}"}}')
            for p in ("direct", "split", "prefill_failed", "no_prefill")}


def answer(url: str, model: str, prompt: str) -> tuple[str, list[float]]:
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True})
    return reply.choices[0].text, reply.choices[0].logprobs.token_logprobs


@pytest.fixture(scope="module")
def serve_url(tiny_model):
    start_local_serve()
    try:
        yield f"http://127.0.0.1:{LISTEN_PORT}"
    finally:
        stop_local_serve()
        assert wait_for(lambda: not engine_processes(), timeout_s=30), engine_processes()


def assert_split_matches_reference(url: str) -> None:
    hits_before = role_stats("decode")["external_prefix_cache_hits"]
    before = paths(url)
    for prompt in PROMPTS:
        text, logprobs = answer(url, SPLIT, prompt)
        ref_text, ref_logprobs = REFERENCE_ANSWERS[prompt]
        assert text == ref_text, (logprobs, ref_logprobs)
        assert logprobs == pytest.approx(ref_logprobs, abs=1e-4)
    assert paths(url)["split"] == before["split"] + len(PROMPTS), (before, paths(url))
    # The decode server got the prompts' KV cache through the connector, not by computing it.
    assert wait_for(lambda: role_stats("decode")["external_prefix_cache_hits"] > hits_before, timeout_s=10)


def test_nixl_split_gives_the_same_tokens_and_logprobs_as_one_mixed_server(serve_url, tiny_model):
    reference = {"name": REFERENCE, "max_model_len": 1024,
                 "engine": vllm_cpu_engine(tiny_model, extra_args=TOOLS_AND_JSON_ARGS),
                 "deployment": {"num_replicas": 1}}
    deploy([reference, split_model(tiny_model, {"connector": "nixl"})])
    for prompt in PROMPTS:
        REFERENCE_ANSWERS[prompt] = answer(serve_url, REFERENCE, prompt)
    assert_split_matches_reference(serve_url)


def test_a_prompt_decode_already_holds_is_not_split_again(serve_url):
    before = paths(serve_url)
    answer(serve_url, SPLIT, PROMPTS[0])  # split once by the test above; its blocks now live on decode
    after = paths(serve_url)
    assert after["direct"] == before["direct"] + 1 and after["split"] == before["split"]


def test_short_prompts_skip_the_split(serve_url):
    before = paths(serve_url)
    answer(serve_url, SPLIT, "hi")
    after = paths(serve_url)
    assert after["direct"] == before["direct"] + 1 and after["split"] == before["split"]


def test_openai_client_streams_a_split_request(serve_url):
    client = OpenAI(base_url=serve_url + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=SPLIT, messages=[{"role": "user", "content": PROMPTS[1] + " stream"}], max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 8


def test_a_json_schema_request_is_split_and_its_answer_validates(serve_url):
    """The prefill hop carries the client's response_format, so both engines run the same grammar."""
    client = OpenAI(base_url=serve_url + "/v1", api_key="unused", max_retries=0)
    before = paths(serve_url)
    reply = client.chat.completions.create(
        model=SPLIT, messages=[{"role": "user", "content": "As JSON: " + PROMPTS[2]}], max_tokens=150, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    assert paths(serve_url)["split"] == before["split"] + 1
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), WEATHER)


def test_requests_complete_when_the_prefill_replica_is_killed(serve_url):
    actors = ray.util.list_named_actors(all_namespaces=True)
    replica = next(a["name"] for a in actors if f"prefill-{SPLIT}" in a["name"])

    def long_request(i: int) -> int:
        prompt = f"request {i}: " + PROMPTS[2]
        r = httpx.post(serve_url + "/v1/completions", timeout=120, json={
            "model": SPLIT, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(long_request, i) for i in range(12)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 12
    assert [long_request(100 + i) for i in range(3)] == [200] * 3
    after = paths(serve_url)
    assert after["prefill_failed"] + after["no_prefill"] > 0


def test_shared_storage_split_gives_the_same_tokens_and_logprobs(serve_url, tiny_model, tmp_path_factory):
    storage = tmp_path_factory.mktemp("kv-store")
    deploy([split_model(tiny_model, {"connector": "shared_storage", "shared_storage_path": str(storage)})])
    assert_split_matches_reference(serve_url)
    assert any(storage.iterdir()), "the prefill engine wrote nothing to the shared folder"
