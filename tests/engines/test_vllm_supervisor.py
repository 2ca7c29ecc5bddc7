"""The vLLM supervisor stops the whole process tree: when told to, and when its replica dies."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.engines.vllm.process import VLLMServerProcess
from tests.helpers import wait_for

FAKE = "tests.engines.fake_vllm_tree"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def read_pid(path: Path) -> int:
    assert wait_for(lambda: path.exists() and path.read_text().strip(), timeout_s=20)
    return int(path.read_text())


@pytest.fixture
def env():
    return {**os.environ, "GATEWAY_ENGINE_SERVER_MODULE": FAKE, "GATEWAY_ENGINE_STOP_GRACE_S": "1"}


def test_stop_takes_down_an_engine_core_that_ignores_sigterm(tmp_path, env):
    process = VLLMServerProcess([str(tmp_path / "core.pid")], env, "http://127.0.0.1:1", name="fake")
    process.start()
    core = read_pid(tmp_path / "core.pid")
    assert process.running and alive(core)
    asyncio.run(process.stop(grace_s=10))
    assert not alive(core)
    assert not process.running


def test_engine_core_is_stopped_when_the_replica_dies(tmp_path, env):
    # A stand-in replica starts the server, then dies without stopping it (as when Ray kills it).
    replica = subprocess.Popen([sys.executable, "-c", (
        "import os, time\n"
        "from app.engines.vllm.process import VLLMServerProcess\n"
        f"p = VLLMServerProcess([{str(tmp_path / 'core.pid')!r}], dict(os.environ), 'http://x', name='fake')\n"
        "p.start(); time.sleep(600)\n"
    )], env=env)
    try:
        core = read_pid(tmp_path / "core.pid")
        assert alive(core)
        replica.kill()
        replica.wait()
        assert wait_for(lambda: not alive(core), timeout_s=10), "the engine core outlived its replica"
    finally:
        replica.kill()


def test_engine_core_is_stopped_when_the_api_server_exits(tmp_path, env):
    process = VLLMServerProcess([str(tmp_path / "core.pid")], env, "http://127.0.0.1:1", name="fake")
    process.start()
    core = read_pid(tmp_path / "core.pid")
    # Kill only the API server (the core's parent), as a crash would.
    api_server = int(open(f"/proc/{core}/stat").read().split(")")[1].split()[1])
    os.kill(api_server, 9)
    try:
        assert wait_for(lambda: not alive(core), timeout_s=10)
        assert wait_for(lambda: not process.running, timeout_s=5)
    finally:
        asyncio.run(process.stop(grace_s=1))


def test_a_server_stuck_after_a_startup_error_fails_fast_with_its_log(monkeypatch, env):
    import httpx

    from app.engines.vllm import process as process_module

    monkeypatch.setattr(process_module, "_CRASH_GRACE_S", 0.5)
    env = {**env, "GATEWAY_ENGINE_SERVER_MODULE": "tests.engines.fake_stuck_server"}
    process = VLLMServerProcess([], env, "http://127.0.0.1:9", name="stuck")
    process.start()

    async def wait() -> None:
        async with httpx.AsyncClient() as client:
            await process.wait_healthy(client, timeout_s=60)

    try:
        started = time.monotonic()
        with pytest.raises(process_module.EngineStartError, match="Address already in use"):
            asyncio.run(wait())
        assert time.monotonic() - started < 20
    finally:
        asyncio.run(process.stop(grace_s=1))


def test_engine_ports_avoid_the_ephemeral_range():
    from app.engines.vllm.process import free_port

    ports = {free_port() for _ in range(20)}
    assert all(20000 <= port < 30000 for port in ports)
