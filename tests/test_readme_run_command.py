"""The README's run commands: `serve run configs/local.yaml` and `scripts/run-local.sh` start a gateway the
openai client can use, served by its ingress replica itself (its own listener, no proxy), and through
Serve's HTTP proxy as well when the config turns the proxy on."""

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


def _local_config_on_free_port(tmp_path: Path, *, proxy_port: int | None = None) -> tuple[Path, int]:
    # The shipped config, on a free port so the test never collides with a running gateway.
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    port = free_port()
    config["applications"][0]["args"]["ingress"]["listen"]["port"] = port
    if proxy_port is not None:
        config["proxy_location"] = "EveryNode"
        config["http_options"]["port"] = proxy_port
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


def _chat_works(url: str) -> None:
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    listed = [(m.id, m.parent) for m in client.models.list()]
    assert listed == [("sim-llama", None), ("sql-lora", "sim-llama"), ("chat-lora", "sim-llama"), ("default", None),
                      ("sim-prod", None)]
    reply = client.chat.completions.create(model="sql-lora", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.model == "sql-lora"
    split = client.chat.completions.with_raw_response.create(
        model="sim-prod", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert split.parse().model == "sim-prod" and split.headers["x-gateway-target"] in ("sim-llama", "sql-lora")
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
        # The ingress replica itself answers: no proxy in between.
        assert "ServeReplica:gateway:ingress" in _listener(port)
        _chat_works(url)


def test_run_local_serves_from_the_ingress_replica_and_through_the_proxy_when_asked(tmp_path):
    proxy_port = free_port()
    path, port = _local_config_on_free_port(tmp_path, proxy_port=proxy_port)
    with _running([str(ROOT / "scripts" / "run-local.sh"), str(path)], tmp_path, {}):
        listener = f"http://127.0.0.1:{port}"
        wait_until_ready(listener + "/v1/models", timeout_s=180)
        wait_until_ready(f"http://127.0.0.1:{proxy_port}/v1/models", timeout_s=60)
        # The ingress replica answers on its own port; Serve's proxy serves the other.
        assert "ServeReplica:gateway:ingress" in _listener(port)
        assert "ProxyActor" in _listener(proxy_port)
        _chat_works(listener)
        _chat_works(f"http://127.0.0.1:{proxy_port}")


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
