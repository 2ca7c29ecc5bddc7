"""Publishes the simulated engine's KV-cache events over ZMQ the way vLLM's `zmq` publisher does.

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": ...}'`)
binds a PUB socket and sends each batch as three frames: topic, an 8-byte big-endian sequence
number, and the msgpack payload. A router subscribed to a real vLLM server reads this server the
same way, so the standalone simulator can stand in for vLLM in routing tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import logging

from app.engines.zmq_socket import ZMQSocketTask
from app.protocol.engine import Engine

logger = logging.getLogger(__name__)


class KVEventPublisher(ZMQSocketTask):
    def __init__(self, engine: Engine, endpoint: str, *, topic: str = "", interval_s: float = 0.02) -> None:
        import zmq

        super().__init__(zmq.PUB)
        self._engine = engine
        self._topic = topic.encode()
        self._interval_s = interval_s
        self._socket.bind(endpoint)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._seq = 0

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            for payload in self._engine.take_kv_events():
                await self._socket.send_multipart([self._topic, self._seq.to_bytes(8, "big"), payload])
                self._seq += 1
