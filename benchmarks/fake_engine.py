"""Many cheap OpenAI-compatible streaming servers in one process, for measuring the gateway's own cost.

Each port answers POST /v1/chat/completions and /v1/completions with a stream of `--tokens` chunks
(`--itl-ms` apart, the first after `--ttft-ms`), a finish chunk, a usage chunk and [DONE]; GET /metrics
with a static vLLM-like page (idle load, cache geometry); GET /health. Pre-built bytes written from
a raw asyncio protocol: the servers cost little CPU, so the machine's cores go to what is measured.

    .venv/bin/python benchmarks/fake_engine.py --ports 9101,9102 --tokens 64 --itl-ms 5
    .venv/bin/python benchmarks/fake_engine.py --count 64      # free ports, printed as a JSON list
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httptools
import uvloop

_METRICS = (
    b"# TYPE vllm:num_requests_running gauge\n"
    b'vllm:num_requests_running{engine="0",model_name="sim-llama"} 0.0\n'
    b'vllm:num_requests_waiting{engine="0",model_name="sim-llama"} 0.0\n'
    b'vllm:kv_cache_usage_perc{engine="0",model_name="sim-llama"} 0.0\n'
    b'vllm:prefix_cache_queries_total{engine="0",model_name="sim-llama"} 0.0\n'
    b'vllm:prefix_cache_hits_total{engine="0",model_name="sim-llama"} 0.0\n'
    b'vllm:prompt_tokens_total{engine="0",model_name="sim-llama"} 0.0\n'
    b'vllm:generation_tokens_total{engine="0",model_name="sim-llama"} 0.0\n'
    b'vllm:request_success_total{engine="0",finished_reason="length",model_name="sim-llama"} 0.0\n'
    b'vllm:cache_config_info{block_size="16",enable_prefix_caching="True",engine="0",num_gpu_blocks="65536",'
    b'prefix_caching_hash_algo="sha256"} 1.0\n'
)


def _chunk(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    event = b"data: " + data.encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _stream(model: str, tokens: int, chat: bool) -> tuple[bytes, bytes, bytes]:
    """(head with the opening chunk, one token chunk, the tail) as chunked HTTP."""
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 1, "model": model}

    def choice(**fields: object) -> dict:
        return {**base, "choices": [{"index": 0, **fields, "logprobs": None}]}

    if chat:
        opening = _chunk(choice(delta={"role": "assistant", "content": ""}, finish_reason=None))
        token = _chunk(choice(delta={"content": " token"}, finish_reason=None))
        finish = _chunk(choice(delta={}, finish_reason="length"))
    else:
        opening = b""
        token = _chunk(choice(text=" token", finish_reason=None))
        finish = _chunk(choice(text="", finish_reason="length"))
    usage = _chunk({**base, "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": tokens,
                                                     "total_tokens": 1000 + tokens,
                                                     "prompt_tokens_details": {"cached_tokens": 0}}})
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + opening
    return head, token, finish + usage + _chunk("[DONE]") + b"0\r\n\r\n"


class FakeEngine(asyncio.Protocol):
    def __init__(self, args: argparse.Namespace, streams: dict[str, tuple[bytes, bytes, bytes]]) -> None:
        self._args = args
        self._streams = streams
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._transport.close()  # type: ignore[union-attr]

    def on_url(self, url: bytes) -> None:
        self._url = url

    def on_message_complete(self) -> None:
        transport = self._transport
        assert transport is not None
        path = self._url.split(b"?")[0]
        if path == b"/metrics":
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                            % (len(_METRICS), _METRICS))
        elif path in (b"/health", b"/v1/models"):
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        else:
            head, token, tail = self._streams["chat" if path.endswith(b"chat/completions") else "completions"]
            loop = asyncio.get_running_loop()
            args = self._args

            def step(sent: int) -> None:
                if transport.is_closing():
                    return
                if sent < args.tokens:
                    transport.write(token)
                    loop.call_later(args.itl_ms / 1000, step, sent + 1)
                else:
                    transport.write(tail)

            transport.write(head)
            loop.call_later(args.ttft_ms / 1000, step, 0)


async def serve(args: argparse.Namespace) -> None:
    streams = {"chat": _stream(args.model, args.tokens, True), "completions": _stream(args.model, args.tokens, False)}
    loop = asyncio.get_running_loop()
    ports = [int(port) for port in args.ports.split(",")] if args.ports else [0] * args.count
    servers = [await loop.create_server(lambda: FakeEngine(args, streams), "127.0.0.1", port, backlog=4096)
               for port in ports]
    # The ports actually bound (port 0 asks the kernel for a free one), for whoever started us.
    print(json.dumps([server.sockets[0].getsockname()[1] for server in servers]), flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ports", help="comma separated")
    p.add_argument("--count", type=int, default=1, help="without --ports: this many servers on free ports")
    p.add_argument("--model", default="sim-llama")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--ttft-ms", type=float, default=1.0)
    p.add_argument("--itl-ms", type=float, default=5.0)
    uvloop.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
