"""A ZMQ socket and the one asyncio task that uses it, started and closed together."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class ZMQSocketTask:
    """Subclasses implement `_run`. `close()` stops the task first, so nothing uses a closed socket."""

    def __init__(self, socket_type: int) -> None:
        import zmq  # imported here so modules that only mention these classes need no pyzmq
        import zmq.asyncio

        self._context = zmq.asyncio.Context()
        self._socket: Any = self._context.socket(socket_type)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._socket.close(linger=0)
        self._context.term()
