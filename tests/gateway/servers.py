"""Test servers for the gateway core: real HTTP on loopback, in the test's own event loop."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from app.gateway.routed import HTTPTransport, RoutedClient
from app.http_listener import HTTPListener
from app.router.scheduler import Scheduler
from app.router.state import ClusterState, ReplicaInfo
from app.upstream import UpstreamPool

ASGIApp = Callable[..., Any]


@contextlib.asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """Serve an ASGI app on a free loopback port; yields its base URL."""
    listener = HTTPListener(app, "127.0.0.1", 0, name="test server", graceful_shutdown_s=1)
    await listener.start()
    try:
        yield f"http://127.0.0.1:{listener.port}"
    finally:
        await listener.stop()


class Recorder:
    """ASGI middleware that keeps the JSON bodies an app received."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if body:
            self.bodies.append(json.loads(body))
            self.paths.append(scope["path"])
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def sse_app(events: list[bytes], status: int = 200) -> ASGIApp:
    """An ASGI app that answers every request with these raw event frames (as a stream)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def fleet(*replicas: tuple[str, str | None, str], model: str = "m", block_size: int = 16,
          node_id: str | None = None) -> ClusterState:
    """Replicas as (id, endpoint_url, role), registered as a router's state would have them."""
    state = ClusterState()
    for replica_id, url, role in replicas:
        state.register(ReplicaInfo(replica_id=replica_id, model=model, role=role, block_size=block_size,  # type: ignore[arg-type]
                                   num_gpu_blocks=1024, endpoint_url=url, kv_events=False, node_id=node_id))
    state.synced_at = float("inf")  # always fresh: no actor in these tests
    return state


def routed_client(state: ClusterState, *, model: str = "m", roles: tuple[str, ...] = ("mixed",),
                  max_attempts: int = 3, pool: UpstreamPool | None = None, **kwargs: Any) -> RoutedClient:
    http = HTTPTransport(pool or UpstreamPool(connect_timeout_s=1.0))
    return RoutedClient(model=model, block_size=16, scheduler=Scheduler(state), transport_for=lambda r: http,
                        roles=roles, max_attempts=max_attempts, **kwargs)  # type: ignore[arg-type]
