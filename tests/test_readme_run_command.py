"""The README's run command: `serve run configs/local.yaml` starts a gateway the openai client can use."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from tests.helpers import free_port, wait_until_ready

pytestmark = pytest.mark.serve
ROOT = Path(__file__).parent.parent


def test_serve_run_local_config(tmp_path):
    # The shipped config, on a free port so the test never collides with a running gateway.
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))

    serve_cli = Path(sys.executable).parent / "serve"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([str(serve_cli), "run", str(path)], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url + "/v1/models", timeout_s=180)
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["sim-llama"]
        reply = client.chat.completions.create(
            model="sim-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        assert 1 <= reply.usage.completion_tokens <= 4
    finally:
        # Ctrl-C is how a user stops `serve run`: it shuts Serve and its local Ray cluster down.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()
