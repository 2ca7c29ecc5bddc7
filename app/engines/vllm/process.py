"""One `vllm serve` child process: its command line, its start, its health and its stop.

The child runs in its own process group under a supervisor (app/engines/vllm/launch.py), so
stopping the group also stops vLLM's engine-core and worker processes, which survive their API
server otherwise, and the supervisor stops them if the replica dies first. Its output goes to the replica's stderr (and
so to the Ray logs), and the last lines are kept to explain a failed start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from app.engines.vllm.config import VLLMEngineConfig
from app.protocol.engine import EngineRole

logger = logging.getLogger(__name__)


_CPU_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # Ray already places the replica; pinning fights it
}
_BASE_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


_CRASH_MARKERS = ("Exception in thread", "Traceback (most recent call last)")
_CRASH_GRACE_S = 15.0


class EngineStartError(RuntimeError):
    """The vLLM server did not become healthy; the message carries the end of its log."""


# Ports for the engine's own listeners come from below Linux's ephemeral range (32768-60999), so an
# outgoing connection cannot take one between our check and vLLM's bind, and above Ray's worker
# ports (10002-19999). A port that bind(0) returned and we closed is no such guarantee: measured,
# a prefill and a decode replica starting together got the same one for their NIXL side channels.
_PORT_RANGE = (20000, 30000)
ENGINE_HOOK_DIR = Path(__file__).with_name("engine_hook")
NIXL_CPU_PROGRESS_DELAY_US = 10_000
CPU_SHM_POLL_SLEEP_US = 200


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on at `host` now, picked at random from _PORT_RANGE."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORT_RANGE} on {host}")


def kv_transfer_config(config: VLLMEngineConfig, role: EngineRole) -> dict[str, Any] | None:
    """vLLM's --kv-transfer-config for a role; None for a mixed engine (no hand-off)."""
    if role == "mixed":
        return None
    transfer = config.kv_transfer
    if transfer.connector == "nixl":
        return {
            "kv_connector": "NixlConnector",
            # vLLM 0.32 deprecates kv_both for NIXL in favour of a role per engine.
            "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
            "kv_buffer_device": transfer.buffer_device or config.device,
            "kv_connector_extra_config": dict(transfer.extra_config),
        }
    return {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
        "kv_connector_extra_config": {
            "shared_storage_path": str(transfer.shared_storage_path),
            **transfer.extra_config,
        },
    }


def server_argv(
    config: VLLMEngineConfig,
    *,
    served_model_name: str,
    max_model_len: int,
    port: int,
    role: EngineRole,
    kv_events_endpoint: str | None,
    adapters: Mapping[str, str] | None = None,
) -> list[str]:
    """Flags for vLLM's OpenAI server (after `python -m vllm.entrypoints.openai.api_server`)."""
    argv = [
        "--model", config.model,
        "--served-model-name", served_model_name,
        "--host", config.server_host,
        "--port", str(port),
        "--dtype", config.dtype,
        "--block-size", str(config.block_size),
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(config.max_num_seqs),
        "--tensor-parallel-size", str(config.tensor_parallel_size),
        "--prefix-caching-hash-algo", config.hash_algo,
        "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
        "--disable-uvicorn-access-log",
        "--enable-prefix-caching" if config.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    if config.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(config.max_num_batched_tokens)]
    if config.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    if config.enforce_eager:
        argv.append("--enforce-eager")
    if kv_events_endpoint is not None:
        events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": kv_events_endpoint, "topic": "kv"}
        argv += ["--kv-events-config", json.dumps(events)]
    transfer = kv_transfer_config(config, role)
    if transfer is not None:
        argv += ["--kv-transfer-config", json.dumps(transfer)]
    if adapters or config.enable_lora:
        argv += ["--enable-lora", "--max-loras", str(config.max_loras), "--max-lora-rank", str(config.max_lora_rank)]
    if adapters:
        # Registered up front, loaded into the max_loras slots when a request needs them (LRU).
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return argv + list(config.extra_args)


def _engine_hook_env(config: VLLMEngineConfig, role: EngineRole) -> dict[str, str]:
    on_cpu = config.device == "cpu"
    hook_env: dict[str, str] = {}
    if role != "mixed" and config.kv_transfer.connector == "nixl":
        delay_us = config.kv_transfer.progress_delay_us
        if delay_us is None:
            delay_us = NIXL_CPU_PROGRESS_DELAY_US if on_cpu else 0
        if delay_us > 0:
            hook_env["GATEWAY_NIXL_PROGRESS_DELAY_US"] = str(delay_us)
    sleep_us = config.shm_poll_sleep_us
    if sleep_us is None:
        sleep_us = CPU_SHM_POLL_SLEEP_US if on_cpu else 0
    if sleep_us > 0:
        hook_env["GATEWAY_SHM_POLL_SLEEP_US"] = str(sleep_us)
    return hook_env


def server_env(
    config: VLLMEngineConfig, role: EngineRole, *, side_channel_host: str, side_channel_port: int,
    lora: bool = False,
) -> dict[str, str]:
    """`lora`: the server runs with LoRA on, and takes adapters added while it serves."""
    env = {**os.environ, **_BASE_ENV, "PYTHONHASHSEED": config.hash_seed}
    if lora:
        # /v1/load_lora_adapter and /v1/unload_lora_adapter: the replica adds and removes adapters while
        # serving. vLLM warns that the routes are for development; here only the gateway reaches them.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if os.path.isdir(config.model):
        env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the hub
    if config.device == "cpu":
        env.update(_CPU_ENV)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_gib)
        if config.cpu_threads is not None:
            env["OMP_NUM_THREADS"] = str(config.cpu_threads)
    if role != "mixed" and config.kv_transfer.connector == "nixl":
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = side_channel_host
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel_port)
        if config.device == "cpu":
            # UCX over TCP: there is no RDMA device on a CPU box. Loopback when both ends are local.
            env.setdefault("UCX_TLS", "tcp,self,sm")
            if side_channel_host.startswith("127."):
                env.setdefault("UCX_NET_DEVICES", "lo")
    hook_env = _engine_hook_env(config, role)
    if hook_env:
        # The hook folder holds only sitecustomize.py, which applies these settings.
        env.update(hook_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ENGINE_HOOK_DIR), env.get("PYTHONPATH")) if p)
    env.update(config.env)
    return env


class VLLMServerProcess:
    def __init__(self, argv: list[str], env: dict[str, str], base_url: str, *, name: str) -> None:
        self._argv = argv
        self._env = env
        self.base_url = base_url
        self.name = name
        self._process: subprocess.Popen[bytes] | None = None
        self._log_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._error_seen_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        """True while any process of the server's group lives (the launcher itself exits at once)."""
        return self._process is not None and _group_alive(self._process)

    def start(self) -> None:
        env = {**self._env, "GATEWAY_ENGINE_PARENT_PID": str(os.getpid())}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "app.engines.vllm.launch", *self._argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: one signal reaches every vLLM process
        )
        threading.Thread(target=self._relay_output, name=f"{self.name}-log", daemon=True).start()
        logger.info("started vLLM server %s (pid %d) at %s", self.name, self._process.pid, self.base_url)

    def _relay_output(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        prefix = f"[{self.name}] ".encode()
        for line in process.stdout:
            text = line.decode(errors="replace").rstrip()
            self._log_tail.append(text)
            if self._error_seen_at is None and any(marker in text for marker in _CRASH_MARKERS):
                self._error_seen_at = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.buffer.write(prefix + line)
                sys.stderr.flush()

    def log_tail(self) -> str:
        return "\n".join(list(self._log_tail))  # a copy: the relay thread appends meanwhile

    async def wait_healthy(self, client: httpx.AsyncClient, timeout_s: float) -> float:
        """Seconds until /health answered 200; raises EngineStartError if the server died or timed out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            # A crashed thread (vLLM's NIXL handshake listener, for one) can leave the server up but
            # never ready; do not wait the whole startup timeout for it.
            crashed_at = self._error_seen_at
            if crashed_at is not None and time.monotonic() - crashed_at > _CRASH_GRACE_S:
                raise EngineStartError(
                    f"vLLM server {self.name} hit an error while starting and is not serving. Its last "
                    f"output:\n{self.log_tail()}"
                )
            if not self.running:
                await asyncio.sleep(0.2)  # let the relay thread catch the last lines
                raise EngineStartError(
                    f"vLLM server {self.name} exited while starting. Its last output:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{self.base_url}/health", timeout=2.0)).status_code == 200:
                    return time.monotonic() - started
            await asyncio.sleep(0.5)
        raise EngineStartError(
            f"vLLM server {self.name} was not healthy after {timeout_s:.0f}s (startup_timeout_s). "
            f"Its last output:\n{self.log_tail()}"
        )

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the whole group, then SIGKILL to whatever is left after `grace_s`."""
        process = self._process
        if process is None:
            return
        pgid = process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(process):  # noqa: ASYNC110 (polling a process)
            await asyncio.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        logger.info("stopped vLLM server %s", self.name)


def _group_alive(process: subprocess.Popen[bytes]) -> bool:
    process.poll()  # reap the launcher, or the check below sees its zombie forever
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
