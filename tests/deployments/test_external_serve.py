"""Routing to servers the gateway does not run: three standalone simulated vLLM servers as real
processes (two publish KV events over ZMQ, one does not), the gateway on a real Ray cluster in front
of them, and the official openai client."""

import asyncio
import concurrent.futures
import contextlib
import random
import threading
import time

import httpx
import kmock
import kubernetes
import openai
import pytest
import ray
import yaml
from openai import OpenAI
from ray import serve

from app.config import parse_gateway_config
from app.deployments.builder import build_gateway
from app.deployments.endpoint_watcher import external_replica_id
from app.deployments.state_actor import NAMESPACE, actor_name
from app.tokenizer import BUILTIN_TOKENIZER_DIR
from tests.helpers import (
    SimServer,
    listen_on_free_port,
    metric_sample,
    metric_value,
    start_local_serve,
    stop_local_serve,
    wait_for,
)

pytestmark = pytest.mark.serve

MODEL = "ext-llama"
K8S_MODEL = "k8s-llama"  # found through Kubernetes discovery, against an API emulator on loopback
TEXT_MODEL = "ext-text"  # the same servers, no tokenizer at the gateway: approximate keys
APP = "external"


@pytest.fixture(scope="module")
def fleet():
    # The servers take shorter prompts than the gateway: their own refusal must reach the client.
    short = ("--max-model-len", "1024")
    servers = [SimServer(time_scale=0.1, kv_events=events, args=short) for events in (True, True, False)]
    try:
        for server in servers:
            server.start(wait=False)
        for server in servers:
            server.wait_ready()
        start_local_serve()
        engine = {
            "kind": "external",
            "served_model_name": "sim-llama",
            "endpoints": [{"url": s.url, "kv_events": s.kv_events} if s.kv_events else s.url for s in servers],
            "down_after_s": 1.0,
            "scrape_interval_s": 0.1,
        }
        args = {
            "models": [
                {"name": MODEL, "max_model_len": 4096, "tokenizer": str(BUILTIN_TOKENIZER_DIR), "engine": engine},
                {"name": TEXT_MODEL, "max_model_len": 4096, "engine": engine},
            ],
        }
        listener = listen_on_free_port(args)
        serve.run(build_gateway(parse_gateway_config(args)), name=APP, route_prefix="/")
        client = OpenAI(base_url=f"{listener}/v1", api_key="unused", max_retries=0, timeout=60)
        assert wait_for(lambda: len(actor_view()["replicas"]) == 6, timeout_s=30)  # 3 servers x 2 models
        yield client, servers
    finally:
        try:
            stop_local_serve()
        finally:
            for server in servers:
                server.stop()


def actor_view() -> dict:
    try:
        actor = ray.get_actor(actor_name(APP), namespace=NAMESPACE)
        return ray.get(actor.describe.remote(), timeout=10)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ValueError):
        return {"replicas": {}}


def served(server: SimServer) -> float:
    return metric_value(server.metrics(), "vllm:request_success_total")


def long_prompt(seed: int, words: int = 120) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma"]) for _ in range(words))


def assert_each_prefix_stays_on_one_server(client: OpenAI, servers: list[SimServer], model: str, seed: int) -> None:
    for group in range(3):
        before = [served(s) for s in servers]
        system = long_prompt(seed + group)
        for turn in range(5):
            client.chat.completions.create(
                model=model, max_tokens=2,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": f"question {turn}"}],
            )
        counts = [served(s) - b for s, b in zip(servers, before, strict=True)]
        # Sent one after another: nothing is busy, so every follow-up goes where the prefix is cached.
        assert max(counts) == 5, counts


def test_openai_client_gets_complete_answers_from_the_servers(fleet):
    client, _ = fleet
    assert [m.id for m in client.models.list().data] == [MODEL, TEXT_MODEL]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=7,
        extra_body={"ignore_eos": True},
    )
    assert reply.model == MODEL and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7 and reply.usage.prompt_tokens > 0 and reply.choices[0].message.content

    chunks = list(client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5

    # The server's own validation reaches the client as the server meant it (a 400, not a retry elsewhere).
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt=long_prompt(1, words=600), max_tokens=1)


def test_shared_prefixes_concentrate_on_one_server_each(fleet):
    client, servers = fleet
    assert_each_prefix_stays_on_one_server(client, servers, MODEL, seed=100)
    hits = sum(metric_value(s.metrics(), "vllm:prefix_cache_hits_total") for s in servers)
    queries = sum(metric_value(s.metrics(), "vllm:prefix_cache_queries_total") for s in servers)
    assert hits / queries > 0.6


def test_without_a_tokenizer_the_servers_tokenize_and_shared_prefixes_still_concentrate(fleet):
    client, servers = fleet
    reply = client.chat.completions.create(
        model=TEXT_MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=7,
        extra_body={"ignore_eos": True},
    )
    assert reply.model == TEXT_MODEL and reply.choices[0].message.content
    # The counts are the servers' own: they rendered the template and tokenized.
    assert reply.usage.completion_tokens == 7 and reply.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(
        model=TEXT_MODEL, messages=[{"role": "user", "content": "stream it"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=TEXT_MODEL, prompt=long_prompt(2, words=600), max_tokens=1)

    assert_each_prefix_stays_on_one_server(client, servers, TEXT_MODEL, seed=200)

    # Said in the metrics, and the servers' KV events are left alone (they could never match).
    gateway_metrics = httpx.get(str(client.base_url).removesuffix("/v1/") + "/metrics", timeout=10).text
    assert metric_sample(gateway_metrics, "gateway_routing_prefix_keys", model=TEXT_MODEL, kind="approximate") == 1
    assert metric_sample(gateway_metrics, "gateway_routing_prefix_keys", model=MODEL, kind="exact") == 1
    statuses = serve.get_deployment_handle(f"endpoints-{TEXT_MODEL}", app_name=APP).status.remote().result(
        timeout_s=10)
    assert [s["kv_events"] for s in statuses] == [False, False, False]


def test_a_killed_server_loses_only_its_requests_and_comes_back_with_an_empty_cache(fleet):
    client, servers = fleet
    victim = servers[0]  # publishes KV events: its entries come from the server itself
    victim_id = external_replica_id(MODEL, victim.url)
    system = long_prompt(7)
    # Put a prefix on the victim: the router's index must then show blocks there.
    client.chat.completions.create(model=MODEL, max_tokens=1,
                                   messages=[{"role": "system", "content": system}, {"role": "user", "content": "x"}])
    assert wait_for(lambda: sum(r["blocks"] for r in actor_view()["replicas"].values()) > 0, timeout_s=10)

    killed_at: list[float] = []
    results: list[tuple[float, float, str]] = []  # (sent, done, outcome)
    lock = threading.Lock()
    stop = threading.Event()

    def one(i: int) -> None:
        sent = time.monotonic()
        try:
            client.chat.completions.create(
                model=MODEL, max_tokens=20, extra_body={"ignore_eos": True},
                messages=[{"role": "system", "content": long_prompt(i % 6)}, {"role": "user", "content": str(i)}],
            )
            outcome = "ok"
        except openai.APIStatusError as error:
            outcome = f"{error.status_code}"
        with lock:
            results.append((sent, time.monotonic(), outcome))

    def load() -> None:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            i = 0
            while not stop.is_set():
                pool.submit(one, i)
                i += 1
                time.sleep(0.03)

    runner = threading.Thread(target=load)
    runner.start()
    try:
        time.sleep(2.0)
        killed_at.append(time.monotonic())
        victim.stop(kill=True)
        # It leaves the candidates once it has not answered for down_after_s.
        assert wait_for(lambda: victim_id not in actor_view()["replicas"], timeout_s=10)
        time.sleep(1.0)
    finally:
        stop.set()
        runner.join()
    kill = killed_at[0]
    failed = [(sent, done, outcome) for sent, done, outcome in results if outcome != "ok"]
    assert len(results) > 60
    # Only requests already running when the server died may fail, and those with a 503.
    assert all(sent < kill and done >= kill and outcome == "503" for sent, done, outcome in failed), failed
    assert all(outcome == "ok" for sent, _, outcome in results if sent >= kill)

    victim.start()
    # Back as a new generation, holding none of the old entries: it has served nothing since.
    assert wait_for(lambda: victim_id in actor_view()["replicas"], timeout_s=15)
    assert actor_view()["replicas"][victim_id]["blocks"] == 0
    statuses = serve.get_deployment_handle(f"endpoints-{MODEL}", app_name=APP).status.remote().result(timeout_s=10)
    victim_status = next(s for s in statuses if s["url"] == victim.url)
    assert victim_status["healthy"] and victim_status["generation"] >= 1
    # And it takes requests again, once the router has it back: new prefixes spread over the three servers.
    ingress = serve.get_deployment_handle("ingress", app_name=APP)
    assert wait_for(lambda: victim_id in ingress.routing_state.remote().result(timeout_s=10)["replicas"], timeout_s=10)
    before = served(victim)
    for i in range(12):
        client.completions.create(model=MODEL, prompt=long_prompt(1000 + i, words=60), max_tokens=1)
    assert served(victim) > before


class KubernetesEmulator:
    """kmock's Kubernetes API emulator on loopback, in a thread of its own, and a kubeconfig for it."""

    def __init__(self, folder) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self.kubeconfig = folder / "kubeconfig"
        self.api: kubernetes.client.CoreV1Api | None = None

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
            self.url = str(emulator.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> "KubernetesEmulator":
        self._thread.start()
        assert self._ready.wait(timeout=30)
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}],
        }))
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        self.api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def put_pod(self, name: str, ip: str, *, ready: bool) -> None:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "llm",
                                                                "labels": {"app": "vllm"}},
               "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}}
        self.api.create_namespaced_pod("llm", pod, _preload_content=False)

    def set_ready(self, name: str) -> None:
        self.api.patch_namespaced_pod(name, "llm", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})


def test_servers_found_through_kubernetes_join_and_leave_the_gateway(fleet, tmp_path):
    """Discovery inside the gateway: a pod's server gets requests once the pod is Ready, and none once
    the pod is gone (the emulator plays the API server; the pod's address is a real server's)."""
    emulator = KubernetesEmulator(tmp_path).start()
    server = SimServer(time_scale=0.1).start()
    app = "external-k8s"
    try:
        emulator.put_pod("server-0", "127.0.0.1", ready=False)  # still loading its model
        args = {"models": [{"name": K8S_MODEL, "tokenizer": str(BUILTIN_TOKENIZER_DIR), "engine": {
            "kind": "external", "served_model_name": "sim-llama", "scrape_interval_s": 0.1, "down_after_s": 1.0,
            "kubernetes": {"namespace": "llm", "label_selector": "app=vllm", "port": server.port,
                           "kubeconfig": str(emulator.kubeconfig)},
        }}]}
        listener = listen_on_free_port(args)
        serve.run(build_gateway(parse_gateway_config(args)), name=app, route_prefix="/k8s")
        client = fleet[0].with_options(base_url=f"{listener}/v1")
        watcher = serve.get_deployment_handle(f"endpoints-{K8S_MODEL}", app_name=app)

        def ask() -> str:
            try:
                client.chat.completions.create(model=K8S_MODEL, max_tokens=2,
                                               messages=[{"role": "user", "content": "hi"}])
                return "ok"
            except openai.APIStatusError as error:
                return f"{error.status_code} {error.code or ''}".strip()

        # The first list is in before the application reports ready, as a fixed list's first scrape is.
        assert watcher.discovery_status.remote().result(timeout_s=10)["lists"] >= 1
        assert ask() == "503 no_healthy_endpoint"  # no ready pod: nothing to route to, and it says so
        emulator.set_ready("server-0")
        assert wait_for(lambda: ask() == "ok", timeout_s=15)
        assert watcher.discovery_status.remote().result(timeout_s=10)["endpoints"] == [server.url]
        emulator.api.delete_namespaced_pod("server-0", "llm")
        assert wait_for(lambda: ask() == "503 no_healthy_endpoint", timeout_s=15)
        assert watcher.discovery_status.remote().result(timeout_s=10)["last_error"] is None
    finally:
        with contextlib.suppress(Exception):
            serve.delete(app)
        server.stop()
        emulator.stop()


def test_sglang_and_plain_openai_servers_serve_and_say_what_they_lack(fleet):
    """Servers beyond vLLM: one speaking SGLang's metrics, one with no /metrics at all (any OpenAI server).
    Both serve; the gateway shows each one's dialect."""
    servers = [SimServer(time_scale=0.1, args=("--metrics-dialect", dialect)) for dialect in ("sglang", "none")]
    app = "dialects"
    try:
        for server in servers:
            server.start()
        engine = {"kind": "external", "served_model_name": "sim-llama", "endpoints": [s.url for s in servers],
                  "scrape_interval_s": 0.1}
        args = {"models": [{"name": "mixed", "max_model_len": 4096, "tokenizer": str(BUILTIN_TOKENIZER_DIR),
                            "engine": engine}]}
        listener = listen_on_free_port(args)
        serve.run(build_gateway(parse_gateway_config(args)), name=app, route_prefix="/dialects")
        handle = serve.get_app_handle(app)
        assert wait_for(lambda: len(handle.routing_state.remote().result(timeout_s=10)["replicas"]) == 2,
                        timeout_s=30)
        client = OpenAI(base_url=f"{listener}/v1", api_key="unused", max_retries=0, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: client.completions.create(
                model="mixed", prompt=long_prompt(100 + i), max_tokens=8, extra_body={"ignore_eos": True}), range(16)))
        assert all(r.choices[0].finish_reason == "length" for r in replies)
        on_sglang = metric_value(servers[0].metrics(), "sglang:num_requests_total")
        assert 0 < on_sglang < 16, "both servers served: the one without metrics is routed on in-flight counts"
        page = httpx.get(f"{listener}/metrics").text
        for dialect in ("sglang", "none"):
            assert any(f'dialect="{dialect}"' in line and line.endswith(" 1.0")
                       for line in page.splitlines() if line.startswith("gateway_replica_metrics_dialect"))
    finally:
        with contextlib.suppress(Exception):
            serve.delete(app)
        for server in servers:
            server.stop()
