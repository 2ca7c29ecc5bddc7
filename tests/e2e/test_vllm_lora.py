"""LoRA adapters on a real vLLM CPU engine, through the gateway: two tiny adapters the test makes (random
low-rank weights on the attention projections), one listed at start and one added while serving."""

import httpx
import pytest
import ray
from openai import NotFoundError, OpenAI
from ray import serve

from app.config import parse_gateway_config
from app.deployments.builder import build_gateway
from app.deployments.state_actor import NAMESPACE, actor_name
from app.tiny_model import build_tiny_lora
from tests.e2e.conftest import engine_processes, vllm_cpu_engine
from tests.helpers import free_port, start_local_serve, stop_local_serve, wait_for

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

APP = "lora"
MODEL = "tiny-llama"
PROMPTS = ["The river by the old stone harbor", "Copper lanterns over the meadow at night"]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    names = ["sql-lora", "chat-lora"]
    return {name: str(build_tiny_lora(root / name, seed=seed)) for seed, name in enumerate(names, 1)}


@pytest.fixture(scope="module")
def gateway(tiny_model, adapters):
    port = free_port()
    args = {
        "models": [{
            "name": MODEL, "max_model_len": 1024,
            "engine": vllm_cpu_engine(tiny_model, max_loras=2, max_lora_rank=8),
            "deployment": {"num_replicas": 1},
            "adapters": [{"name": "sql-lora", "source": adapters["sql-lora"]}],
        }],
        "ingress": {"listen": {"host": "127.0.0.1", "port": port}},
    }
    start_local_serve()
    try:
        serve.run(build_gateway(parse_gateway_config(args)), name=APP, route_prefix="/lora")
        handle = serve.get_app_handle(APP)
        assert wait_for(lambda: len(handle.routing_state.remote().result(timeout_s=30)["replicas"]) == 1,
                        timeout_s=60)
        engine_url = serve.get_deployment_handle(f"engine-{MODEL}", app_name=APP).engine_url.remote().result(
            timeout_s=30)
        yield f"http://127.0.0.1:{port}", engine_url, handle
    finally:
        stop_local_serve()
        assert wait_for(lambda: not engine_processes(), timeout_s=30), engine_processes()


def answers(base_url: str, model: str) -> list[str]:
    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return [client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
            for p in PROMPTS]


def test_each_adapter_answers_as_vllm_serving_it_directly_and_unlike_the_base(gateway, adapters):
    url, engine_url, handle = gateway
    listed = {m["id"]: m.get("parent") for m in httpx.get(url + "/v1/models").json()["data"]}
    assert listed["sql-lora"] == MODEL
    base, sql = answers(url, MODEL), answers(url, "sql-lora")
    assert sql != base
    assert sql == answers(engine_url, "sql-lora")  # vLLM's own server, not through the gateway

    # Added while serving: loaded onto the engine at run time (vLLM's /v1/load_lora_adapter), no restart.
    engine_before = set(handle.routing_state.remote().result(timeout_s=30)["replicas"])
    added = handle.add_adapter.remote(MODEL, "chat-lora", adapters["chat-lora"]).result(timeout_s=120)
    assert added == {"replicas": 1, "serving": {"chat-lora": 1, "sql-lora": 1}}
    chat = answers(url, "chat-lora")
    assert chat not in (base, sql)
    assert chat == answers(engine_url, "chat-lora")
    assert set(handle.routing_state.remote().result(timeout_s=30)["replicas"]) == engine_before


def test_the_gateways_keys_for_an_adapter_are_the_blocks_vllm_stores(gateway):
    url, _, handle = gateway
    body = {"model": "sql-lora", "prompt": " ".join(["harbor lantern meadow"] * 40), "max_tokens": 1}
    assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
    keys = handle.routing_keys.remote("completions", body).result(timeout_s=30)
    base_keys = handle.routing_keys.remote("completions", {**body, "model": MODEL}).result(timeout_s=30)
    assert len(keys) >= 3 and not set(keys) & set(base_keys)  # the adapter is folded into every block
    actor = ray.get_actor(actor_name(APP), namespace=NAMESPACE)
    assert wait_for(lambda: max(ray.get(actor.match.remote(keys)).values(), default=0) == len(keys), timeout_s=15)


def test_an_unknown_adapter_is_a_404_and_a_removed_one_leaves_the_engine(gateway):
    url, engine_url, handle = gateway
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(NotFoundError, match="no-such-lora"):
        client.completions.create(model="no-such-lora", prompt="hi", max_tokens=2)
    handle.remove_adapter.remote("chat-lora").result(timeout_s=60)
    with pytest.raises(NotFoundError, match="chat-lora"):
        client.completions.create(model="chat-lora", prompt="hi", max_tokens=2)

    def engine_serves() -> set[str]:
        return {m["id"] for m in httpx.get(engine_url + "/v1/models").json()["data"]}

    assert wait_for(lambda: "chat-lora" not in engine_serves(), timeout_s=30)  # /v1/unload_lora_adapter
    assert "sql-lora" in engine_serves()
