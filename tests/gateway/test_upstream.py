"""The HTTP client to engine servers: streamed bodies, kept connections, and failures it reports apart."""

import asyncio

import pytest

from app.upstream import UpstreamError, UpstreamPool
from tests.gateway.servers import serving, sse_app
from tests.helpers import free_port


async def test_a_streamed_body_arrives_in_pieces_and_the_connection_is_kept():
    connections = []

    async def app(scope, receive, send):
        connections.append(scope["client"])
        await sse_app([b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"])(scope, receive, send)

    pool = UpstreamPool()
    async with serving(app) as url:
        for _ in range(3):
            response = await pool.request(url, "/v1/chat/completions", b"{}")
            assert response.status == 200 and response.header(b"content-type") == b"text/event-stream"
            assert await response.read() == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert len({client for client in connections}) == 1  # one connection, reused
    pool.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced_not_failed():
    pool = UpstreamPool(idle_ttl_s=60)
    async with serving(sse_app([b"data: x\n\n"])) as url:
        first = await pool.request(url, "/", b"{}")
        await first.read()
        # The server drops the idle connection (as uvicorn does after its keep-alive timeout).
        for connection in pool._idle[pool.origin(url)]:
            connection.transport.close()
        await asyncio.sleep(0.05)
        again = await pool.request(url, "/", b"{}")
        assert await again.read() == b"data: x\n\n"


async def test_an_unreachable_server_is_reported_as_never_answering():
    with pytest.raises(UpstreamError) as failure:
        await UpstreamPool(connect_timeout_s=1).request(f"http://127.0.0.1:{free_port()}", "/", b"{}")
    assert failure.value.responded is False


async def test_closing_early_closes_the_connection_so_the_server_sees_the_client_go():
    disconnected = asyncio.Event()

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        if (await receive())["type"] == "http.disconnect":
            disconnected.set()

    pool = UpstreamPool()
    async with serving(app) as url:
        response = await pool.request(url, "/", b"{}")
        async for _ in response.pieces():
            break
        response.close()
        await asyncio.wait_for(disconnected.wait(), 5)
