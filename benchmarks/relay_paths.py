"""What carrying a token stream costs, by the way it is carried: the measurements behind the gateway's
data path (its own listener, uvicorn with app/upstream.py), against the alternatives.

A minimal relay (read the request body, POST it upstream, pass the streamed answer back as bytes) in
front of a fake streaming server (benchmarks/fake_engine.py: 64 chunks 4 ms apart), built several ways;
a closed-loop client at `--concurrency`. Reported: the relay's CPU per request, read from /proc for
every process of it (for Serve: the replica, Serve's proxy or HAProxy).

    .venv/bin/python benchmarks/relay_paths.py [--concurrency 20] [--seconds 10]

Variants: `uvicorn+upstream` (the gateway's choice), `uvicorn+aiohttp`, `uvicorn+httpx` (the gateway's
client before), `aiohttp` (server and client), and through Ray Serve: `serve-proxy` (Serve's Python
HTTP proxy, then the replica) and `serve-haproxy` (RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy, then the
replica's own uvicorn; user code on the replica's main loop). The Serve variants need nothing else
running on the machine's ports 8404, 9101 and 8500 (HAProxy's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import proc_cpu, raw_load
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent

_RELAYS = {
    "uvicorn+upstream": """
        from app.upstream import UpstreamPool
        pool = None
        async def relay(body):
            global pool
            pool = pool or UpstreamPool()
            response = await pool.request(UPSTREAM, "/v1/chat/completions", body)
            return response.status, response.pieces(), response.close
    """,
    "uvicorn+aiohttp": """
        import aiohttp
        session = None
        async def relay(body):
            global session
            session = session or aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            response = await session.post(UPSTREAM + "/v1/chat/completions", data=body,
                                          headers={"content-type": "application/json"})
            return response.status, response.content.iter_any(), response.release
    """,
    "uvicorn+httpx": """
        import httpx
        client = None
        async def relay(body):
            global client
            client = client or httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None))
            request = client.build_request("POST", UPSTREAM + "/v1/chat/completions", content=body,
                                           headers={"content-type": "application/json"})
            response = await client.send(request, stream=True)
            return response.status_code, response.aiter_raw(), lambda: None
    """,
}

_ASGI = """
    async def app(scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    await send({"type": message["type"] + ".complete"})
                    if message["type"] == "lifespan.shutdown":
                        return
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, pieces, close = await relay(body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/event-stream")]})
        async for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        close()
"""

_UVICORN = """
    import sys, uvicorn
    UPSTREAM = sys.argv[2]
    {relay}
    {asgi}
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="off")
"""

_AIOHTTP = """
    import sys, aiohttp, uvloop
    from aiohttp import web
    UPSTREAM = sys.argv[2]
    async def handle(request):
        body = await request.read()
        async with request.app["session"].post(UPSTREAM + "/v1/chat/completions", data=body,
                                               headers={"content-type": "application/json"}) as upstream:
            out = web.StreamResponse(status=upstream.status, headers={"content-type": "text/event-stream"})
            await out.prepare(request)
            async for piece in upstream.content.iter_any():
                await out.write(piece)
            await out.write_eof()
            return out
    async def make():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handle)
        async def session(app):
            app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            yield
            await app["session"].close()
        app.cleanup_ctx.append(session)
        return app
    uvloop.install()
    web.run_app(make(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

_SERVE = """
    import sys, time, ray
    from ray import serve
    UPSTREAM = sys.argv[2]
    {relay}
    {asgi}
    @serve.deployment(ray_actor_options={{"num_cpus": 0}}, max_ongoing_requests=1000)
    @serve.ingress()
    class Relay:
        def __serve_build_asgi_app__(self):
            return app  # cloudpickle carries it, and the relay with it, to the replica
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={{"host": "127.0.0.1", "port": int(sys.argv[1])}})
    serve.run(Relay.bind(), name="relay", route_prefix="/")
    print("READY", flush=True)
    time.sleep(1e9)
"""


def _script(kind: str, folder: Path) -> Path:
    if kind == "aiohttp":
        text = textwrap.dedent(_AIOHTTP)
    else:
        template = _SERVE if kind.startswith("serve") else _UVICORN
        relay = _RELAYS["uvicorn+upstream" if kind.startswith("serve") else kind]
        text = textwrap.dedent(template).format(relay=textwrap.dedent(relay).strip(),
                                                asgi=textwrap.dedent(_ASGI).strip())
    path = folder / f"relay_{kind.replace('+', '_').replace('-', '_')}.py"
    path.write_text(text)
    return path


def measure(kind: str, upstream: str, concurrency: int, seconds: float, folder: Path) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    if kind == "serve-haproxy":
        env.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD="0",
                   RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0")
    log = open(folder / f"{kind}.log", "w")  # kept open for the relay's lifetime
    process = subprocess.Popen([sys.executable, str(_script(kind, folder)), str(port), upstream], env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if kind.startswith("serve"):
            deadline = time.monotonic() + 120
            while "READY" not in (folder / f"{kind}.log").read_text() and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(3)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        wait_until_ready_post(url)
        body = [json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi " * 500}],
                            "stream": True}).encode()]
        asyncio.run(raw_load.run(url, body, 20, 2))  # warm
        before = proc_cpu.snapshot()
        summary = asyncio.run(raw_load.closed(url, body[0], concurrency, seconds)).summary()
        result = {key: summary[key] for key in ("completed", "errors", "completed_per_s", "ttft_p50_ms")}
        after = proc_cpu.snapshot()
        tree = proc_cpu.descendants(after, {process.pid}) | proc_cpu.descendants(before, {process.pid})
        spent = proc_cpu.cpu_by_process(before, after, tree)
        by_label: dict[str, float] = {}
        for pid, cpu in spent.items():
            label = proc_cpu.label(after.processes[pid])
            by_label[label] = by_label.get(label, 0.0) + cpu
        done = max(1, result["completed"])
        return {"relay": kind, **result, "cpu_ms_per_request": 1000 * sum(spent.values()) / done,
                "by_process_ms_per_request": {k: round(1000 * v / done, 3) for k, v in
                                              sorted(by_label.items(), key=lambda kv: -kv[1])[:6]}}
    finally:
        from benchmarks.routers_head_to_head import _stop_process_tree

        _stop_process_tree(process, 30, interrupt=True)
        log.close()


def wait_until_ready_post(url: str) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.post(url, json={"model": "m", "messages": []}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relays", default="uvicorn+upstream,uvicorn+aiohttp,uvicorn+httpx,aiohttp,serve-proxy,"
                                       "serve-haproxy")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--json")
    args = p.parse_args()
    from benchmarks.ingress_rate import start_fake

    fake, (upstream_port,) = start_fake(1, 64, 4.0)
    upstream = f"http://127.0.0.1:{upstream_port}"
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="relay-paths-"))
    try:
        for kind in args.relays.split(","):
            row = measure(kind, upstream, args.concurrency, args.seconds, folder)
            rows.append(row)
            print(f"{kind:18s} {row['completed_per_s']:6.1f} req/s  errors {row['errors']}  TTFT p50 "
                  f"{row['ttft_p50_ms']:5.2f} ms  relay CPU {row['cpu_ms_per_request']:5.2f} ms/request  "
                  f"{row['by_process_ms_per_request']}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    main()
