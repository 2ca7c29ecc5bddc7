"""The live state of a server the gateway does not run: load, health and restarts, read from outside."""

import asyncio

import httpx
import pytest

from app.engines.external.monitor import EndpointMonitor
from app.protocol.engine import CacheConfig
from app.upstream import UpstreamPool
from tests.gateway.servers import serving
from tests.helpers import SimServer

DECLARED = CacheConfig(block_size=16, num_gpu_blocks=1000)
SGLANG_PAGE = b"""# HELP sglang:num_running_reqs The number of running requests.
sglang:num_running_reqs{model_name="m"} 3
sglang:num_queue_reqs{model_name="m"} 2
sglang:token_usage{model_name="m"} 0.25
sglang:max_total_num_tokens{model_name="m"} 32000
sglang:prompt_tokens_total{model_name="m"} 900
sglang:generation_tokens_total{model_name="m"} 300
sglang:cached_tokens_total{model_name="m"} 450
sglang:num_requests_total{model_name="m"} 7
"""
# vLLM before it exported its cache geometry, with the KV gauge's old name.
OLD_VLLM_PAGE = b"""vllm:num_requests_running{model_name="m"} 1
vllm:num_requests_waiting{model_name="m"} 4
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
vllm:prompt_tokens_total{model_name="m"} 10
"""


def server(pages: dict[str, bytes]):
    """A server answering GET `path` with its page, 404 elsewhere."""
    async def app(scope, receive, send):
        page = pages.get(scope["path"])
        status, body = (200, page) if page is not None else (404, b"not found")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    return serving(app)


async def test_load_health_and_a_restart_are_seen_from_outside():
    server = SimServer().start()
    url = server.url
    try:
        async with httpx.AsyncClient() as http:
            monitor = EndpointMonitor(url, UpstreamPool(), model="sim-llama", endpoint_id="ep-0", declared=DECLARED,
                                      down_after_s=0.5)
            assert not monitor.healthy  # nothing read yet
            assert (await monitor.poll()).ok and monitor.healthy
            assert monitor.stats.cache_config.block_size == 16

            for _ in range(3):
                reply = await http.post(url + "/v1/completions", json={
                    "model": "sim-llama", "prompt": "a prompt " * 20, "max_tokens": 2})
                assert reply.status_code == 200
            result = await monitor.poll()
            assert result.ok and not result.restarted and monitor.generation == 0
            assert monitor.stats.request_success == 3 and monitor.stats.prompt_tokens > 0

            # The monitor itself late (a stalled loop) is no outage: the server answered whenever asked.
            await asyncio.sleep(0.7)
            assert monitor.healthy
            result = await monitor.poll()
            assert result.ok and not result.restarted and monitor.generation == 0

            # A quick restart (back before the monitor calls the server down): its counters start again.
            server.stop()
            failed = await monitor.poll()
            assert not failed.ok and "ConnectError" in failed.error
            server.start()
            result = await monitor.poll()
            assert result.ok and result.restarted and monitor.generation == 1

            # A long outage: unhealthy meanwhile, and coming back counts as a restart even with no
            # counter lower (nothing had run before it either).
            server.stop()
            await asyncio.sleep(0.7)
            assert not (await monitor.poll()).ok
            assert not monitor.healthy
            server.start()
            result = await monitor.poll()
            assert result.ok and result.restarted and monitor.generation == 2 and monitor.healthy
    finally:
        server.stop()


async def test_sglang_metrics_are_read_as_a_second_dialect():
    async with server({"/metrics": SGLANG_PAGE}) as url:
        monitor = EndpointMonitor(url, UpstreamPool(), model="m", endpoint_id="ep-s", declared=DECLARED)
        assert (await monitor.poll()).ok and monitor.healthy
    stats = monitor.stats
    assert monitor.dialect == "sglang"
    assert (stats.num_requests_running, stats.num_requests_waiting, stats.kv_cache_usage_perc) == (3, 2, 0.25)
    assert (stats.prefix_cache_hits, stats.prefix_cache_queries, stats.request_success) == (450, 900, 7)
    assert stats.cache_config.num_gpu_blocks == 32000 // 16 and stats.cache_config.block_size == 16


async def test_an_older_vllm_without_cache_info_uses_the_declared_geometry():
    async with server({"/metrics": OLD_VLLM_PAGE}) as url:
        monitor = EndpointMonitor(url, UpstreamPool(), model="m", endpoint_id="ep-o", declared=DECLARED)
        assert (await monitor.poll()).ok
    assert monitor.dialect == "vllm" and monitor.stats.kv_cache_usage_perc == 0.5
    assert monitor.stats.num_requests_waiting == 4 and monitor.stats.cache_config == DECLARED


@pytest.mark.parametrize("pages", [
    {"/health": b"ok"},  # no /metrics at all
    {"/health": b"ok", "/metrics": b"# just some other exporter\nup 1\n"},
])
async def test_any_other_openai_server_is_alive_by_its_health_route(pages):
    async with server(pages) as url:
        monitor = EndpointMonitor(url, UpstreamPool(), model="m", endpoint_id="ep-g", declared=DECLARED)
        assert (await monitor.poll()).ok and monitor.healthy
    assert monitor.dialect == "none"
    assert monitor.stats.num_requests_running == 0 and monitor.stats.cache_config == DECLARED


async def test_a_server_with_neither_metrics_nor_health_is_not_answering():
    async with server({"/metrics": b"up 1\n"}) as url:
        monitor = EndpointMonitor(url, UpstreamPool(), model="m", endpoint_id="ep-x", declared=DECLARED)
        result = await monitor.poll()
    assert not result.ok and not monitor.healthy and "/health" in result.error


async def test_a_declared_dialect_the_page_does_not_speak_is_an_error_naming_what_is_missing():
    async with server({"/metrics": b"up 1\n", "/health": b"ok"}) as url:
        monitor = EndpointMonitor(url, UpstreamPool(), model="m", endpoint_id="ep-x", declared=DECLARED,
                                  metrics="vllm")
        result = await monitor.poll()
    assert not result.ok and "vllm:num_requests_running" in result.error
