"""Live settings through Serve's own declarative deploy (what `serve deploy` and a RayService edit do): the
ingress deployment's `user_config` adds an adapter and a traffic split in place, no replica restarts; a
bad one is refused and what was in force keeps serving. Then adapters added and removed from a handle
while streams run: nothing fails, a removed adapter is a 404 and leaves the engines."""

import threading
import time

import httpx
import pytest
from openai import NotFoundError, OpenAI
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from tests.helpers import free_port, metric_value, start_local_serve, stop_local_serve, wait_for

pytestmark = pytest.mark.serve

APP = "live"


def serve_config(port: int, user_config: dict | None) -> dict:
    args = {
        "models": [{"name": "base", "engine": {"time_scale": 0.05, "max_loras": 2},
                    "deployment": {"num_replicas": 2}, "adapters": [{"name": "lora-a"}]}],
        "ingress": {"listen": {"host": "127.0.0.1", "port": port}},
    }
    app = {"name": APP, "route_prefix": "/live", "import_path": "app.deployments.builder:build_app", "args": args}
    if user_config is not None:
        app["deployments"] = [{"name": "ingress", "user_config": user_config}]
    return {"applications": [app]}


def deploy(config: dict) -> None:
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def replica_ids(handle) -> tuple[str, set[str]]:
    state = handle.routing_state.remote().result(timeout_s=10)
    return state["router_id"], set(state["replicas"])


@pytest.fixture(scope="module")
def gateway():
    start_local_serve()
    try:
        port = free_port()
        deploy(serve_config(port, None))
        assert wait_for(lambda: serve.status().applications.get(APP) is not None
                        and serve.status().applications[APP].status == "RUNNING", timeout_s=60)
        handle = serve.get_app_handle(APP)
        assert wait_for(lambda: len(replica_ids(handle)[1]) == 2, timeout_s=30)
        yield port, f"http://127.0.0.1:{port}", handle
    finally:
        stop_local_serve()


def served(url: str) -> dict[str, str | None]:
    return {m["id"]: m.get("parent") for m in httpx.get(url + "/v1/models").json()["data"]}


def test_user_config_changes_adapters_and_splits_in_place(gateway):
    port, url, handle = gateway
    before = replica_ids(handle)
    split = {"prod": {"targets": [{"target": "base", "weight": 1}, {"target": "lora-b", "weight": 1}]}}
    deploy(serve_config(port, {"adapters": {"base": [{"name": "lora-a"}, {"name": "lora-b"}]}, "traffic": split}))
    assert wait_for(lambda: "prod" in served(url), timeout_s=30)
    assert served(url)["lora-b"] == "base"
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    assert client.completions.create(model="lora-b", prompt="new adapter", max_tokens=3).model == "lora-b"
    targets = {client.completions.with_raw_response.create(model="prod", prompt=f"split {i}", max_tokens=2)
               .headers["x-gateway-target"] for i in range(4)}
    assert targets == {"base", "lora-b"}
    assert replica_ids(handle) == before  # reconfigured in place: the same ingress and engine replicas

    # A split naming an adapter that does not exist: refused, counted, and the old settings keep serving.
    errors = metric_value(httpx.get(url + "/metrics").text, "gateway_live_config_errors_total")
    bad = {"prod": {"targets": [{"target": "lora-zz", "weight": 1}]}}
    deploy(serve_config(port, {"adapters": {"base": [{"name": "lora-a"}, {"name": "lora-b"}]}, "traffic": bad}))
    assert wait_for(lambda: metric_value(httpx.get(url + "/metrics").text, "gateway_live_config_errors_total")
                    > errors, timeout_s=30)
    assert client.completions.with_raw_response.create(model="prod", prompt="still", max_tokens=2).headers[
        "x-gateway-target"] in {"base", "lora-b"}
    assert replica_ids(handle) == before


def test_adapters_added_and_removed_from_a_handle_under_streaming_load(gateway):
    _, url, handle = gateway
    failures: list[str] = []
    served_by: list[str] = []
    stop = threading.Event()

    def stream(model: str) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                body = {"model": model, "prompt": "steady", "max_tokens": 8, "stream": True}
                with http.stream("POST", url + "/v1/completions", json=body) as response:
                    text = response.read().decode()
                if response.status_code == 404 and model == "lora-c":
                    continue  # refused before anything ran: not yet added, or removed
                if response.status_code != 200 or "[DONE]" not in text or '"error"' in text:
                    failures.append(f"{model}: {response.status_code} {text[:200]}")
                served_by.append(model)

    threads = [threading.Thread(target=stream, args=(model,)) for model in ("lora-a", "lora-a", "lora-c")]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        added = handle.add_adapter.remote("base", "lora-c").result(timeout_s=60)
        assert added["serving"]["lora-c"] == added["replicas"] == 2, added
        assert wait_for(lambda: served_by.count("lora-c") >= 5, timeout_s=30)
        handle.remove_adapter.remote("lora-a").result(timeout_s=60)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    # Streams for lora-a that began before the removal finished; after it, lora-a is an unknown model.
    assert [f for f in failures if not f.startswith("lora-a: 404")] == []
    with pytest.raises(NotFoundError, match="lora-a"):
        OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).completions.create(
            model="lora-a", prompt="gone", max_tokens=2)
    # Each engine unloads it once its requests for it are done.
    engines = serve.get_deployment_handle("engine-base", app_name=APP)

    def unloaded_everywhere() -> bool:
        return all("lora-a" not in engines.adapters.remote().result(timeout_s=10)["serving"] for _ in range(8))

    assert wait_for(unloaded_everywhere, timeout_s=30)
    assert sorted(handle.live_settings.remote().result(timeout_s=10)["adapters"]["base"]) == ["lora-b", "lora-c"]
