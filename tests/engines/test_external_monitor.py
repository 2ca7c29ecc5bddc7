"""The live state of a server the gateway does not run: load, health and restarts, read from outside."""

import asyncio

import httpx

from app.engines.external.monitor import EndpointMonitor
from app.upstream import UpstreamPool
from tests.gateway.servers import serving
from tests.helpers import SimServer


async def test_load_health_and_a_restart_are_seen_from_outside():
    server = SimServer().start()
    url = server.url
    try:
        async with httpx.AsyncClient() as http:
            monitor = EndpointMonitor(url, UpstreamPool(), model="sim-llama", endpoint_id="ep-0", down_after_s=0.5)
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


async def test_a_server_that_is_not_vllm_is_reported_not_trusted():
    async def other_exporter(scope, receive, send):
        page = b"# just some other exporter\nup 1\n"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(page))]})
        await send({"type": "http.response.body", "body": page})

    async with serving(other_exporter) as url:
        monitor = EndpointMonitor(url, UpstreamPool(), model="m", endpoint_id="ep-x")
        result = await monitor.poll()
    assert not result.ok and not monitor.healthy
    assert "vllm:num_requests_running" in result.error
