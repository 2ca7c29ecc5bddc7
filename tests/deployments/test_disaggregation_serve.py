"""Prefill/decode disaggregation through Serve, on simulated engines (1 prefill + 1 decode replica)."""

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
from tests.helpers import listen_on_free_port, metric_value, start_local_serve, stop_local_serve, wait_for

pytestmark = pytest.mark.serve

MODEL = "sim-split"


def split_args() -> dict:
    return {
        "models": [{
            "name": MODEL,
            "max_model_len": 4096,
            "engine": {"time_scale": 0.05, "block_size": 16},
            "deployment": {"num_replicas": 0},
            "disaggregation": {
                # Slow prefill (about 0.15 s per prompt), so that killing it catches requests mid-prefill.
                "prefill": {"num_replicas": 1, "engine_overrides": {
                    "max_num_batched_tokens": 4096, "time_scale": 1.0, "step_time": {"prefill_s_per_token": 0.0005}}},
                "decode": {"num_replicas": 1},
                "min_split_tokens": 64,
                "prefill_timeout_s": 10,
            },
        }],
    }


@pytest.fixture(scope="module")
def gateway():
    start_local_serve()
    try:
        args = split_args()
        listener = listen_on_free_port(args)
        serve.run(build_gateway(parse_gateway_config(args)), name="gateway", route_prefix="/")
        assert wait_for(lambda: len(routing_state()["replicas"]) == 2, timeout_s=30)
        yield listener
    finally:
        stop_local_serve()


def routing_state() -> dict:
    return serve.get_app_handle("gateway").routing_state.remote().result(timeout_s=30)


def paths(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {p: metric_value(text, f'gateway_disaggregation_requests_total{{model="{MODEL}",path="{p}"}}')
            for p in ("direct", "split", "prefill_failed", "no_prefill")}


def complete(url: str, words: int, tag: str, max_tokens: int = 4) -> httpx.Response:
    prompt = f"{tag} " + " ".join(f"w{i}" for i in range(words))
    return httpx.post(url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})


def decode_stats() -> dict:
    replicas = routing_state()["replicas"].values()
    return next(r["engine_stats"] for r in replicas if r["role"] == "decode")


def test_long_prompts_are_split_and_decode_pulls_the_kv_cache(gateway):
    before, hits_before = paths(gateway), decode_stats()["external_prefix_cache_hits"]
    r = complete(gateway, 400, "long")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    after = paths(gateway)
    assert after["split"] == before["split"] + 1
    assert wait_for(lambda: decode_stats()["external_prefix_cache_hits"] > hits_before, timeout_s=5)


def test_short_prompts_go_straight_to_decode(gateway):
    before = paths(gateway)
    assert complete(gateway, 10, "short").status_code == 200
    after = paths(gateway)
    assert after["direct"] == before["direct"] + 1 and after["split"] == before["split"]


def test_a_cached_prompt_is_not_split_again(gateway):
    assert complete(gateway, 400, "again").status_code == 200
    wait_for(lambda: False, timeout_s=0.5)  # let the decode replica's KV events reach the router
    before = paths(gateway)
    assert complete(gateway, 400, "again").status_code == 200
    assert paths(gateway)["direct"] == before["direct"] + 1


def test_requests_complete_when_the_prefill_replica_dies(gateway):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "prefill-sim-split" in a["name"]]
    assert names
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, gateway, 300, f"kill{i}", 8) for i in range(16)]
        time.sleep(0.5)  # the first prefill batch takes about 2 s: kill it in the middle
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 16
    more = [complete(gateway, 300, f"after{i}").status_code for i in range(4)]
    assert more == [200] * 4
    after = paths(gateway)
    print("paths after the kill:", after)
    assert after["prefill_failed"] + after["no_prefill"] > 0


def test_requests_waiting_on_a_dead_decode_replica_are_retried_on_another(gateway):
    # Two decode replicas that run one sequence at a time, so requests wait inside them before their
    # first token; one of them is killed while they wait.
    args = split_args()
    args["models"][0]["disaggregation"]["decode"] = {"num_replicas": 2, "engine_overrides": {
        "max_num_seqs": 1, "time_scale": 1.0}}
    url = listen_on_free_port(args)
    serve.run(build_gateway(parse_gateway_config(args)), name="retry", route_prefix="/retry")
    handle = serve.get_app_handle("retry")
    assert wait_for(lambda: len(handle.routing_state.remote().result()["replicas"]) == 3, timeout_s=30)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(complete, url, 5, f"retry{i}", 64) for i in range(12)]
        time.sleep(0.5)
        victim = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if "retry#decode-sim-split" in a["name"])
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        responses = [f.result() for f in futures]
    failed = [r for r in responses if r.status_code != 200]
    # Only the request the victim was generating when it died can fail (it had already begun); it
    # fails with a 503 a client can retry. Every request still waiting there completes elsewhere.
    assert len(failed) <= 1, [r.text for r in failed]
    assert all(r.status_code == 503 and r.json()["error"]["message"] for r in failed)
    serve.delete("retry")


def test_structured_and_tool_streams_are_split_and_stay_valid(gateway):
    """The prefill hop carries the client's response_format and tools; the decode replica streams the
    answer, valid against its schema."""
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    before = paths(gateway)
    long = " ".join(f"w{i}" for i in range(300))
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "json " + long}], max_tokens=100, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), schema)
    tool = {"type": "function", "function": {"name": "forecast", "parameters": schema}}
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tool " + long}], max_tokens=100, stream=True,
        tools=[tool], tool_choice={"type": "function", "function": {"name": "forecast"}})
    deltas = [d for c in stream if c.choices for d in c.choices[0].delta.tool_calls or []]
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), schema)
    assert paths(gateway)["split"] == before["split"] + 2
