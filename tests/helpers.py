"""Shared helpers for tests that start servers: free ports, waiting for readiness."""

import socket
import subprocess
import sys
import time

import httpx

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before: servers started later would
    otherwise collide when the kernel offers a just-closed port twice."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until_ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as error:
            last_error = error
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s (last error: {last_error})")


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def metric_value(metrics_text: str, name: str) -> float:
    """Sum of a metric's samples in Prometheus text (all label sets)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_sample(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels` (0 when none)."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") and all(label in line.split("}")[0] for label in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def listen_on_free_port(args: dict) -> str:
    """Give a gateway config (application args) its own listener on a free loopback port; its base URL."""
    port = free_port()
    args.setdefault("ingress", {})["listen"] = {"host": "127.0.0.1", "port": port}
    return f"http://127.0.0.1:{port}"


class BaseURL(str):
    """A gateway's base URL on one way in (its listener, or Serve's proxy), with a second app's beside it."""

    def __new__(cls, url: str, **others: str) -> "BaseURL":
        value = super().__new__(cls, url)
        value.__dict__.update(others)
        return value


def start_local_serve() -> int:
    """Start Ray (2 logical CPUs, no dashboard) and Serve's proxy on a free loopback port."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def stop_local_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


class SimServer:
    """A standalone simulated vLLM server (`python -m app.engines.simulated`) as a real process,
    which a test can kill and start again on the same port, as an operator restarts a pod."""

    def __init__(self, *, time_scale: float = 0.05, kv_events: bool = False, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kv_events = f"tcp://127.0.0.1:{free_port()}" if kv_events else None
        self._args = ["--time-scale", str(time_scale), *args]
        if self.kv_events:
            self._args += ["--kv-events-endpoint", self.kv_events]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> "SimServer":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.engines.simulated", "--port", str(self.port), *self._args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        wait_until_ready(self.url + "/health", timeout_s=60)

    def stop(self, *, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text
