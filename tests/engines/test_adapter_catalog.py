"""An engine's adapters brought to the live settings through its runtime-LoRA routes, here the simulated
server's (the same routes and answers as vLLM's; the real-vLLM layer runs them on vLLM)."""

import asyncio

import httpx
import pytest

from app.engines.adapter_catalog import AdapterCatalog, AdapterLoadError, ServerAdapterAdmin
from app.upstream import UpstreamPool
from tests.helpers import SimServer


@pytest.fixture(scope="module")
def server():
    sim = SimServer(args=("--lora-modules", "first=sim://first")).start()
    try:
        yield sim
    finally:
        sim.stop()


def served(server: SimServer) -> dict[str, str | None]:
    return {m["id"]: m["parent"] for m in httpx.get(server.url + "/v1/models").json()["data"]}


def complete(server: SimServer, model: str) -> int:
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    return httpx.post(server.url + "/v1/completions", json=body).status_code


def test_the_catalog_loads_what_is_added_and_unloads_what_is_removed_once_drained(server):
    async def run() -> None:
        pool = UpstreamPool()
        catalog = AdapterCatalog(ServerAdapterAdmin(pool, server.url), {"first": "sim://first"}, min_drain_s=0.5)
        catalog.want({"second": "sim://second"}, now=0.0)
        await catalog.reconcile(busy=set, now=0.1)
        assert catalog.serving == {"first": "sim://first", "second": "sim://second"}  # not drained yet
        await catalog.reconcile(busy=lambda: {"first"}, now=1.0)
        assert "first" in catalog.serving  # requests for it still run
        await catalog.reconcile(busy=set, now=1.1)
        assert catalog.serving == {"second": "sim://second"} and catalog.settled
        pool.close()

    asyncio.run(run())
    assert served(server) == {"sim-llama": None, "second": "sim-llama"}
    assert complete(server, "second") == 200
    assert complete(server, "first") == 404


def test_loading_twice_is_not_an_error_and_a_missing_unload_is_done(server):
    async def run() -> None:
        pool = UpstreamPool()
        admin = ServerAdapterAdmin(pool, server.url)
        await admin.load("twice", "sim://twice")
        await admin.load("twice", "sim://twice")  # another replica's catalog got there first
        await admin.unload("twice")
        await admin.unload("twice")
        pool.close()

    asyncio.run(run())


def test_a_server_without_runtime_lora_routes_is_said_plainly():
    class NoRoutes:
        async def load(self, name: str, path: str, *, replace: bool = False) -> None:
            raise AdapterLoadError("no runtime LoRA routes")

        async def unload(self, name: str) -> None:
            raise AdapterLoadError("no runtime LoRA routes")

    async def run() -> AdapterCatalog:
        catalog = AdapterCatalog(NoRoutes(), {}, retry_s=10)
        catalog.want({"x": "/adapters/x"}, now=0.0)
        await catalog.reconcile(busy=set, now=0.0)
        await catalog.reconcile(busy=set, now=5.0)  # not retried before retry_s
        return catalog

    catalog = asyncio.run(run())
    assert catalog.serving == {} and not catalog.settled
