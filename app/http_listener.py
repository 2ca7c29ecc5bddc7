"""HTTP servers run inside Ray replicas: the gateway's own listener, and engine replicas' OpenAI servers.

uvicorn (httptools, on the replica's uvloop), started on the replica's event loop. The gateway's
listener binds with SO_REUSEPORT, so every ingress replica on a node listens on the same port and the
kernel spreads connections over them; across nodes, any TCP load balancer in front (a Kubernetes
Service) spreads them over the nodes. Clients thus reach an ingress replica with no proxy hop:
measured against Serve's HTTP proxy and its HAProxy mode in benchmarks/README.md ("The data path").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, TextIO

import uvicorn

logger = logging.getLogger("ray.serve")

BACKLOG = 4096
"""Connections the kernel queues before the server accepts them: a burst of new clients must wait
in it, not be refused."""


class ListenerError(RuntimeError):
    """The server could not bind its address, or stopped at start."""


def bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ListenerError(
            f"cannot listen on {host}:{port} ({error.strerror}): another program holds the port (for the "
            "gateway's listener: Serve's own HTTP proxy, if http_options.port is the same; set `proxy_location: "
            "Disabled` or pick another `ingress.listen.port`)"
        ) from None
    return sock


class PortClaim:
    """Makes a shared (SO_REUSEPORT) port one group's alone: the replicas of one application share it,
    another application asking for it is refused, instead of silently getting half its connections.

    Each sharer holds a shared lock on a file named after the port, with the group's name in it, for as
    long as its process lives; the kernel drops a dead process's lock, so a claim never goes stale.
    """

    def __init__(self, host: str, port: int, group: str) -> None:
        folder = Path(tempfile.gettempdir()) / "llm-gateway-ports"
        folder.mkdir(exist_ok=True)
        self._path = folder / f"{host.replace(':', '_')}-{port}"
        self._port = port
        self._group = group
        self._file: TextIO | None = None

    def acquire(self) -> None:
        file = open(self._path, "a+")  # held open: the lock lives with the file
        try:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Someone holds it: share it if it is our own group.
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
                file.seek(0)
                owner = file.read().strip()
                if owner != self._group:
                    raise ListenerError(
                        f"port {self._port} on this node is taken by {owner or 'another group'}: "
                        f"give {self._group} its own `ingress.listen.port`"
                    ) from None
            else:
                file.seek(0)
                file.truncate()
                file.write(self._group)
                file.flush()
                os.fsync(file.fileno())
                fcntl.flock(file, fcntl.LOCK_SH)  # downgrade: our group's other replicas may join
        except BaseException:
            file.close()
            raise
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class HTTPListener:
    """One ASGI app served from inside a replica; `start()` once ready to serve, `stop()` to drain."""

    def __init__(
        self, app: Any, host: str, port: int = 0, *, share_with: str | None = None, keep_alive_s: float = 5.0,
        graceful_shutdown_s: float = 20.0, name: str = "listener",
    ) -> None:
        """`share_with`: a group name (an application's); its members share the port (SO_REUSEPORT)."""
        self.host, self.port = host, port
        self._claim = PortClaim(host, port, share_with) if share_with is not None else None
        self._name = name
        config = uvicorn.Config(
            app, host=host, port=port, http="httptools", lifespan="off", access_log=False, log_config=None,
            timeout_keep_alive=max(1, round(keep_alive_s)), timeout_graceful_shutdown=round(graceful_shutdown_s),
            backlog=BACKLOG, server_header=False,
        )
        self._server = uvicorn.Server(config)
        # A Ray worker's signals belong to Ray: uvicorn must not take them over.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._claim is not None:
            self._claim.acquire()
        try:
            sock = bind(self.host, self.port, reuse_port=self._claim is not None)
        except BaseException:
            if self._claim is not None:
                self._claim.release()
            raise
        self.port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise ListenerError(f"the {self._name} on {self.host}:{self.port} stopped at start")
            await asyncio.sleep(0.005)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the graceful timeout), close."""
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self._task
        self._task = None
        if self._claim is not None:
            self._claim.release()
