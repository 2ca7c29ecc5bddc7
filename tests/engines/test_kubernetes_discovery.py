"""Kubernetes discovery against a Kubernetes API emulator on loopback (kmock): ready pods that match
the selector become endpoints; pods that become ready, stop being ready or go away change the set."""

import asyncio
import contextlib

import kmock
from kubernetes import client

from app.engines.external.config import KubernetesDiscovery
from app.engines.external.kubernetes import KubernetesPodDiscovery, pod_endpoint

NAMESPACE = "llm"


def pod(name: str, ip: str, *, ready: bool = True, app: str = "vllm") -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": app, "model": "llama"}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_only_ready_matching_pods_are_endpoints():
    config = KubernetesDiscovery(namespace=NAMESPACE, label_selector="app=vllm,model=llama", port=8000,
                                 kv_events_port=5557)
    endpoint = pod_endpoint(pod("a", "10.1.2.3"), config)
    assert endpoint.url == "http://10.1.2.3:8000" and endpoint.kv_events == "tcp://10.1.2.3:5557"
    assert pod_endpoint(pod("b", "10.1.2.4", ready=False), config) is None
    assert pod_endpoint(pod("c", "10.1.2.5", app="other"), config) is None
    deleting = pod("d", "10.1.2.6")
    deleting["metadata"]["deletionTimestamp"] = "2026-11-21T00:00:00Z"
    assert pod_endpoint(deleting, config) is None
    assert pod_endpoint(pod("e", "fd00::7"), config).url == "http://[fd00::7]:8000"


async def _eventually(condition, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    assert condition()


async def test_pods_are_followed_through_list_and_watch():
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        configuration = client.Configuration()
        configuration.host = str(emulator.url).rstrip("/")
        api = client.CoreV1Api(client.ApiClient(configuration))

        def create(body: dict) -> None:
            api.create_namespaced_pod(NAMESPACE, body, _preload_content=False)

        await asyncio.to_thread(create, pod("server-0", "10.0.0.10"))
        await asyncio.to_thread(create, pod("server-1", "10.0.0.11", ready=False))  # still loading its model
        await asyncio.to_thread(create, pod("other", "10.0.0.12", app="other"))

        seen: list[list[str]] = []

        async def on_change(endpoints) -> None:
            seen.append([e.url for e in endpoints])

        discovery = KubernetesPodDiscovery(
            KubernetesDiscovery(namespace=NAMESPACE, label_selector="app=vllm"), on_change,
            api_client=client.ApiClient(configuration), retry_s=0.2,
        )
        task = asyncio.create_task(discovery.run())
        try:
            await _eventually(lambda: seen and seen[-1] == ["http://10.0.0.10:8000"])
            # server-1 finished loading: it joins.
            await asyncio.to_thread(api.patch_namespaced_pod, "server-1", NAMESPACE,
                                    {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
            await _eventually(lambda: seen[-1] == ["http://10.0.0.10:8000", "http://10.0.0.11:8000"])
            # server-0 goes away: it leaves.
            await asyncio.to_thread(api.delete_namespaced_pod, "server-0", NAMESPACE)
            await _eventually(lambda: seen[-1] == ["http://10.0.0.11:8000"])
            assert all(["http://10.0.0.12:8000"] != urls for urls in seen)  # never the other app's pod
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_an_unreachable_api_server_keeps_the_last_set_and_says_why():
    calls: list[list] = []

    async def on_change(endpoints) -> None:
        calls.append(endpoints)

    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # nothing listens on the discard port
    discovery = KubernetesPodDiscovery(KubernetesDiscovery(label_selector="app=vllm"), on_change,
                                       api_client=client.ApiClient(configuration), retry_s=0.1)
    task = asyncio.create_task(discovery.run())
    try:
        await _eventually(lambda: discovery.last_error is not None)
        assert calls == []
        assert "Connection refused" in discovery.last_error or "MaxRetryError" in discovery.last_error
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
