"""What the gateway adds in front of a server you already run: the same server called directly and
through the gateway as an external engine.

    .venv/bin/python -m app.tiny_model models/tiny-llama
    .venv/bin/python benchmarks/external_overhead.py --server vllm                 # the gateway's listener
    .venv/bin/python benchmarks/external_overhead.py --server vllm --path proxy    # Serve's HTTP proxy
    .venv/bin/python benchmarks/external_overhead.py --server sim

One server started by hand, as a user would: real vLLM on CPU with the tiny test model (`vllm`), or
the project's simulated vLLM server in real time (`sim`). The gateway knows it as an external engine
under two model names: `exact`, with the model's tokenizer (the gateway tokenizes to key prefixes
exactly), and `approximate`, without (approximate keys); either way the client's body goes to the
server's own route. The same streaming chat request goes to the three
targets in a closed loop, alternating rounds at each concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import vllm_overhead
from benchmarks.loadgen import run_load
from benchmarks.vllm_overhead import PROMPT, row, start, stop
from tests.helpers import SimServer, free_port, wait_until_ready

SERVED = "tiny-llama"


class VLLMServer:
    """`vllm serve` of the tiny model on loopback, in a process group of its own (vLLM forks)."""

    def __init__(self, model_dir: str) -> None:
        from app.engines.vllm.config import VLLMEngineConfig

        self.config = VLLMEngineConfig.model_validate(vllm_overhead.engine(model_dir))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kv_events = f"tcp://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from app.engines.vllm.process import server_argv, server_env

        argv = server_argv(self.config, served_model_name=SERVED, max_model_len=1024, port=self.port, role="mixed",
                           kv_events_endpoint=self.kv_events)
        env = server_env(self.config, "mixed", side_channel_host="127.0.0.1", side_channel_port=free_port())
        self.process = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv],
                                        env=env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_ready(self.url + "/health", timeout_s=600)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def gateway_config(server: VLLMServer | SimServer, tokenizer: str) -> dict:
    vllm = isinstance(server, VLLMServer)
    engine = {
        "kind": "external", "served_model_name": SERVED,
        "endpoints": [{"url": server.url, "kv_events": server.kv_events}],
        "block_size": server.config.block_size if isinstance(server, VLLMServer) else 16,
    }
    limit = 1024 if vllm else 4096
    return {"models": [
        {"name": "exact", "tokenizer": tokenizer, "max_model_len": limit, "engine": engine},
        {"name": "approximate", "max_model_len": limit, "engine": engine},
    ]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=["vllm", "sim"], default="vllm")
    parser.add_argument("--model", default="models/tiny-llama", help="vllm: the model folder")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2, help="alternate the targets this many times")
    parser.add_argument("--path", choices=["listen", "proxy"], default="listen",
                        help="clients reach the gateway on its own listener (default) or through Serve's proxy")
    args = parser.parse_args()
    vllm_overhead.PATH = args.path

    from app.tokenizer import BUILTIN_TOKENIZER_DIR

    if args.server == "vllm":
        model_dir = os.path.abspath(args.model)
        server: VLLMServer | SimServer = VLLMServer(model_dir)
        tokenizer = model_dir
    else:
        server = SimServer(time_scale=1.0, kv_events=True, args=("--model", SERVED))
        tokenizer = str(BUILTIN_TOKENIZER_DIR)
    server.start()
    try:
        port = start(gateway_config(server, tokenizer), replicas=2)
        try:
            gateway = f"http://127.0.0.1:{port}"
            targets = [("server direct", server.url, SERVED), ("gateway, tokenizer", gateway, "exact"),
                       ("gateway, no tokenizer", gateway, "approximate")]
            print("| target | concurrency | requests | errors | TTFT p50 ms | TTFT p99 ms | ITL mean ms | e2e p50 ms "
                  "| req/s |\n|---|---|---|---|---|---|---|---|---|")
            for concurrency in args.concurrency:
                for name, url, model in targets * args.rounds:
                    result = asyncio.run(run_load(url, model=model, concurrency=concurrency, requests=args.requests,
                                                  prompt=PROMPT, max_tokens=args.max_tokens))
                    print(row(name, concurrency, result.summary()), flush=True)
        finally:
            stop()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
