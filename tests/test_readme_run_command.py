"""The README's run commands: `serve run configs/local.yaml` starts a gateway the openai client can use,
and `GATEWAY_DIRECT_INGRESS=1 scripts/run-local.sh` also serves it from the ingress replica itself."""

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from openai import OpenAI

from tests.helpers import free_port, wait_until_ready

pytestmark = pytest.mark.serve
ROOT = Path(__file__).parent.parent


def _local_config_on_free_port(tmp_path: Path) -> tuple[Path, int]:
    # The shipped config, on a free port so the test never collides with a running gateway.
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


def _chat_works(url: str) -> None:
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["sim-llama"]
    reply = client.chat.completions.create(
        model="sim-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    assert 1 <= reply.usage.completion_tokens <= 4
    stream = client.chat.completions.create(
        model="sim-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 4


def _listener(port: int) -> str:
    """The process title of whatever listens on 127.0.0.1:port."""
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return " ".join(psutil.Process(connection.pid).cmdline())
    return ""


def test_serve_run_local_config(tmp_path):
    path, port = _local_config_on_free_port(tmp_path)
    serve_cli = Path(sys.executable).parent / "serve"
    with _running([str(serve_cli), "run", str(path)], tmp_path, {}):
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url + "/v1/models", timeout_s=180)
        _chat_works(url)


def test_run_local_with_direct_ingress(tmp_path):
    path, port = _local_config_on_free_port(tmp_path)
    direct_port = free_port()
    env = {"GATEWAY_DIRECT_INGRESS": "1", "GATEWAY_DIRECT_INGRESS_PORT": str(direct_port)}
    with _running([str(ROOT / "scripts" / "run-local.sh"), str(path)], tmp_path, env):
        direct = f"http://127.0.0.1:{direct_port}"
        wait_until_ready(direct + "/v1/models", timeout_s=180)
        # The ingress replica itself answers, not Serve's proxy; the proxy still serves its own port.
        assert "ServeReplica:gateway:ingress" in _listener(direct_port)
        assert "ProxyActor" in _listener(port)
        _chat_works(direct)
        _chat_works(f"http://127.0.0.1:{port}")


@contextlib.contextmanager
def _running(command: list[str], tmp_path: Path, extra_env: dict[str, str]) -> Iterator[None]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **extra_env}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        yield
    finally:
        # Ctrl-C is how a user stops `serve run`: it shuts Serve and its local Ray cluster down.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()
