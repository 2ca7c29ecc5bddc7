"""Finds external servers in Kubernetes: the ready pods that match a label selector.

A list, then a watch from the list's resource version, with the official `kubernetes` client (it
blocks, so it runs in a worker thread). Every change to the set of ready pods is handed to
`on_change` as the full list of endpoints, which the watcher reconciles with what it follows. A
failed or expired watch lists again after a short pause; until a list succeeds the last known set
stays as it was, so an API-server hiccup does not empty the candidate set.

A pod counts when it has an IP, its Ready condition is True, and it is not being deleted: a pod
that is starting (model still loading) or draining gets no requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from app.engines.external.config import ExternalEndpoint, KubernetesDiscovery

logger = logging.getLogger("ray.serve")

OnChange = Callable[[list[ExternalEndpoint]], Awaitable[None]]


def _labels_match(labels: dict[str, str], selector: str) -> bool:
    """Equality-based selectors (`a=b,c!=d`, `a` for "has label"), checked here as well as by the
    API server, so a server that ignores the selector still yields only matching pods."""
    for term in (t.strip() for t in selector.split(",") if t.strip()):
        if "!=" in term:
            key, value = (part.strip() for part in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (part.strip() for part in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def pod_endpoint(pod: dict[str, Any], config: KubernetesDiscovery) -> ExternalEndpoint | None:
    """The endpoint of a ready pod that matches the selector, else None."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP") or status.get("pod_ip")
    if not ip or metadata.get("deletionTimestamp") or metadata.get("deletion_timestamp"):
        return None
    if not _labels_match(metadata.get("labels") or {}, config.label_selector):
        return None
    ready = any(c.get("type") == "Ready" and str(c.get("status")) == "True" for c in status.get("conditions") or [])
    if not ready:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    events = f"tcp://{host}:{config.kv_events_port}" if config.kv_events_port else None
    return ExternalEndpoint(url=f"{config.scheme}://{host}:{config.port}", kv_events=events)


def load_api_client(config: KubernetesDiscovery) -> Any:
    """A client from the pod's service account or a kubeconfig, as the config says. It is this
    discovery's own: the kubernetes package's global default configuration is left alone."""
    from kubernetes import client
    from kubernetes import config as kube_config

    kubeconfig = str(config.kubeconfig) if config.kubeconfig is not None else None
    if kubeconfig is not None or config.in_cluster is False:
        return kube_config.new_client_from_config(config_file=kubeconfig, persist_config=False)
    configuration = client.Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        if config.in_cluster is True:
            raise
        return kube_config.new_client_from_config(persist_config=False)
    return client.ApiClient(configuration)


class KubernetesPodDiscovery:
    def __init__(
        self,
        config: KubernetesDiscovery,
        on_change: OnChange,
        *,
        api_client: Any = None,
        retry_s: float = 2.0,
        watch_timeout_s: int = 60,
    ) -> None:
        self._config = config
        self._on_change = on_change
        self._api_client = api_client
        self._retry_s = retry_s
        self._watch_timeout_s = watch_timeout_s
        self._pods: dict[str, ExternalEndpoint] = {}
        self._published: list[ExternalEndpoint] | None = None
        self._stopping = threading.Event()
        self._watch: Any = None
        self.lists = 0
        self.last_error: str | None = None

    async def run(self) -> None:
        """List and watch until cancelled; each change of the ready set calls `on_change`."""
        loop = asyncio.get_running_loop()
        changes: asyncio.Queue[list[ExternalEndpoint]] = asyncio.Queue()

        def publish() -> None:
            endpoints = sorted(self._pods.values(), key=lambda e: e.url)
            if endpoints != self._published:
                self._published = endpoints
                loop.call_soon_threadsafe(changes.put_nowait, endpoints)

        worker = loop.run_in_executor(None, self._list_and_watch_forever, publish)
        try:
            while True:
                getter = asyncio.ensure_future(changes.get())
                done, _ = await asyncio.wait({getter, worker}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    worker.result()  # the thread only ends by raising (a bug): surface it
                    return
                await self._on_change(getter.result())
        finally:
            self._stopping.set()
            if self._watch is not None:
                self._watch.stop()

    def _list_and_watch_forever(self, publish: Callable[[], None]) -> None:
        from kubernetes import client, watch

        namespace, selector = self._config.namespace, self._config.label_selector
        api: Any = None
        while not self._stopping.is_set():
            try:
                # Loaded in the loop: a kubeconfig or service account that is missing or broken is
                # reported and retried like an unreachable API server, not a crash.
                api = api or client.CoreV1Api(self._api_client or load_api_client(self._config))
                listing = api.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False,
                                                  _request_timeout=30)
                data = _json(listing)
                self.lists += 1
                self._pods = {}
                for pod in data.get("items") or []:
                    self._apply("ADDED", pod)
                publish()
                if self.last_error is not None:
                    logger.info("Kubernetes discovery (%s in %s) works again", selector, namespace)
                    self.last_error = None
                self._watch = watch.Watch()
                version = (data.get("metadata") or {}).get("resourceVersion")
                for event in self._watch.stream(
                    api.list_namespaced_pod, namespace, label_selector=selector, resource_version=version,
                    timeout_seconds=self._watch_timeout_s, _request_timeout=self._watch_timeout_s + 10,
                ):
                    if self._stopping.is_set():
                        return
                    kind, pod = event.get("type"), event.get("raw_object") or {}
                    if kind == "ERROR":
                        break  # usually 410 Gone: our version is too old; list again
                    self._apply(kind, pod)
                    publish()
            except Exception as error:  # API server down, RBAC, expired watch: keep the last set, retry
                if self._stopping.is_set():
                    return
                message = f"{type(error).__name__}: {error}"
                if message != self.last_error:
                    logger.warning("Kubernetes discovery (%s in %s) failed, keeping the last known %d servers: %s",
                                   selector, namespace, len(self._pods), message[:300])
                self.last_error = message
                self._stopping.wait(self._retry_s)

    def _apply(self, kind: str | None, pod: dict[str, Any]) -> None:
        metadata = pod.get("metadata") or {}
        key = metadata.get("uid") or f"{metadata.get('namespace')}/{metadata.get('name')}"
        endpoint = pod_endpoint(pod, self._config) if kind != "DELETED" else None
        if endpoint is None:
            self._pods.pop(key, None)
        else:
            self._pods[key] = endpoint


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data)
