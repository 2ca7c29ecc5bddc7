"""LoRA adapters through Serve on simulated engines: 3 replicas of 2 slots each, 6 adapters. The adapter
scorer keeps each adapter where it is loaded, so loads stay near the minimum (one per adapter)."""

import random

import httpx
import pytest
from openai import OpenAI
from ray import serve

from app.config import parse_gateway_config
from app.deployments.builder import build_gateway
from tests.helpers import listen_on_free_port, start_local_serve, stop_local_serve, wait_for

pytestmark = pytest.mark.serve

ADAPTERS = [f"lora-{i}" for i in range(6)]


def engine_adapters(app: str) -> dict[str, dict]:
    handle = serve.get_deployment_handle("engine-base", app_name=app)
    seen: dict[str, dict] = {}
    for _ in range(12):
        stats = handle.stats.remote().result(timeout_s=10)
        seen[stats.engine_id] = stats.adapters.model_dump()
    return seen


@pytest.fixture(scope="module")
def gateway():
    start_local_serve()
    try:
        args = {"models": [{
            "name": "base", "max_model_len": 2048,
            "engine": {"time_scale": 0.05, "max_loras": 2, "lora_load_s": 0.2},
            "deployment": {"num_replicas": 3},
            "adapters": [{"name": name} for name in ADAPTERS],
        }]}
        listener = listen_on_free_port(args)
        serve.run(build_gateway(parse_gateway_config(args)), name="adapters", route_prefix="/adapters")
        handle = serve.get_app_handle("adapters")
        assert wait_for(lambda: len(handle.routing_state.remote().result(timeout_s=10)["replicas"]) == 3,
                        timeout_s=30)
        yield listener
    finally:
        stop_local_serve()


def test_requests_for_an_adapter_stay_where_it_is_loaded(gateway):
    client = OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id: m.parent for m in client.models.list()} == {"base": None, **{a: "base" for a in ADAPTERS}}
    rng = random.Random(3)
    for i in range(60):
        adapter = rng.choice(ADAPTERS)
        reply = client.completions.create(model=adapter, prompt=f"request {i} " + "word " * rng.randint(5, 40),
                                          max_tokens=2)
        assert reply.model == adapter
    engines = engine_adapters("adapters")
    assert len(engines) == 3
    loads = sum(e["loads"] for e in engines.values())
    print(f"adapter loads for 60 requests: {loads}")
    # 6 adapters over 3 replicas of 2 slots: 6 loads at the least. Round-robin would load on most requests.
    assert loads <= 9, engines
    # The gateway shows each replica's adapters on its metrics page (as of its latest stats).
    def shown_loads() -> float:
        page = httpx.get(gateway + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                   if line.startswith("gateway_replica_adapters{") and 'signal="loads"' in line)

    assert wait_for(lambda: shown_loads() == loads, timeout_s=5)
