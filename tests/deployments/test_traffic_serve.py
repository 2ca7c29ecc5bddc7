"""A rollout and a rollback through Serve, while streams run: weights set on the app's handle reach every
ingress replica within a second, and no request fails or is served twice."""

import threading
import time
from collections import Counter

import httpx
import pytest
from ray import serve

from app.config import parse_gateway_config
from app.deployments.builder import build_gateway
from tests.helpers import listen_on_free_port, start_local_serve, stop_local_serve, wait_for

pytestmark = pytest.mark.serve

APP = "rollout"


def weights(v1: float, v2: float) -> dict:
    return {"llama-prod": {"targets": [{"target": "llama-v1", "weight": v1}, {"target": "llama-v2", "weight": v2}]}}


@pytest.fixture(scope="module")
def gateway():
    start_local_serve()
    try:
        engine = {"time_scale": 0.05}
        args = {
            "models": [{"name": "llama-v1", "engine": engine, "deployment": {"num_replicas": 1}},
                       {"name": "llama-v2", "engine": engine, "deployment": {"num_replicas": 1}}],
            "traffic": weights(100, 0),
            "ingress": {"num_replicas": 2},
        }
        listener = listen_on_free_port(args)
        serve.run(build_gateway(parse_gateway_config(args)), name=APP, route_prefix="/rollout")
        handle = serve.get_app_handle(APP)
        assert wait_for(lambda: len(handle.routing_state.remote().result(timeout_s=10)["replicas"]) == 2,
                        timeout_s=30)
        yield listener, handle
    finally:
        stop_local_serve()


def every_ingress_has(handle, expected: dict) -> bool:
    # Calls land on the replicas at random: ask enough times to hear from both.
    return all(handle.traffic.remote().result(timeout_s=10) == expected for _ in range(12))


def test_a_rollout_and_a_rollback_under_streaming_load_lose_nothing(gateway):
    url, handle = gateway
    results: list[tuple[float, int, str | None, bool]] = []
    stop = threading.Event()

    def stream_forever() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                began = time.monotonic()
                body = {"model": "llama-prod", "prompt": "roll out", "max_tokens": 6, "stream": True,
                        "ignore_eos": True}
                with http.stream("POST", url + "/v1/completions", json=body) as response:
                    text = response.read().decode()
                complete = text.rstrip().endswith("data: [DONE]") and '"error"' not in text
                results.append((began, response.status_code, response.headers.get("x-gateway-target"),
                                complete))

    workers = [threading.Thread(target=stream_forever) for _ in range(4)]
    for worker in workers:
        worker.start()
    marks, calls = {}, {}
    try:
        for v2 in (10, 50, 100, 0):  # 0 -> 10 -> 50 -> 100, then the rollback
            time.sleep(1.5)
            started = calls[v2] = time.monotonic()
            assert handle.set_traffic.remote(weights(100 - v2, v2)).result(timeout_s=10) == {
                "llama-prod": {"llama-v1": 100 - v2, "llama-v2": v2}}
            assert wait_for(lambda v2=v2: every_ingress_has(handle, {"llama-prod": {"llama-v1": 100 - v2,
                                                                                    "llama-v2": v2}}),
                            timeout_s=5)
            marks[v2] = time.monotonic()
            assert marks[v2] - started < 2.0
        time.sleep(1.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert results and all(status == 200 and complete for _, status, _, complete in results), \
        Counter((s, c) for _, s, _, c in results)
    # Requests begun once every ingress replica had the weights (and before the next change was asked
    # for): all on v2 at 100, all on v1 after the rollback.
    at_100 = [t for began, _, t, _ in results if marks[100] < began < calls[0]]
    after_rollback = [t for began, _, t, _ in results if began > marks[0]]
    assert at_100 and set(at_100) == {"llama-v2"}
    assert after_rollback and set(after_rollback) == {"llama-v1"}


def test_a_split_that_cannot_be_served_is_refused_and_the_old_one_stays(gateway):
    _, handle = gateway
    before = handle.traffic.remote().result(timeout_s=10)
    with pytest.raises(Exception, match="unknown target 'llama-v9'"):
        handle.set_traffic.remote({"llama-prod": {"targets": [{"target": "llama-v9", "weight": 1}]}}).result(
            timeout_s=10)
    with pytest.raises(Exception, match="more than 0"):
        handle.set_traffic.remote(weights(0, 0)).result(timeout_s=10)
    assert every_ingress_has(handle, before)
