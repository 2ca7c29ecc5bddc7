"""Receives a vLLM engine's KV-cache events over ZMQ and keeps a mirror of what it has cached.

For an engine the gateway starts, the subscriber binds a loopback port before the engine starts and
vLLM connects to it, so nothing published from the first block on is missed. For a server someone
else runs (vLLM binds its own publisher), it connects to the server's endpoint instead. Payload
frames are passed on untouched (the cluster state decodes them, as it does a simulated engine's);
the mirror answers `cached_block_hashes()` when the replica has to register again, for example
after the state actor restarted.
"""

from __future__ import annotations

import collections
import logging

from app.engines.zmq_socket import ZMQSocketTask
from app.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventDecodeError, decode_batch

logger = logging.getLogger(__name__)


class KVEventSubscriber(ZMQSocketTask):
    def __init__(
        self, *, host: str = "127.0.0.1", connect: str | None = None, max_pending_batches: int = 10_000
    ) -> None:
        import zmq

        super().__init__(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        if connect is not None:
            self._socket.connect(connect)
            self.endpoint: str = connect
        else:
            self._socket.bind(f"tcp://{host}:*")
            self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # Bounded: if the state actor is unreachable for long, the oldest batches go (re-registering
        # sends the mirror instead).
        self._pending: collections.deque[bytes] = collections.deque(maxlen=max_pending_batches)
        self._cached: set[int] = set()
        self._next_seq: int | None = None
        self.missed_batches = 0
        self.publisher_restarts = 0
        """Times the sequence started over: the publishing server restarted with an empty cache."""

    async def _run(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            if len(frames) != 3:
                logger.warning("ignoring a KV event message with %d frames (expected 3)", len(frames))
                continue
            _topic, seq_frame, payload = frames
            self._check_sequence(int.from_bytes(seq_frame, "big"))
            self._pending.append(payload)
            self._mirror(payload)

    def _check_sequence(self, seq: int) -> None:
        if self._next_seq is not None and seq != self._next_seq:
            gap = seq - self._next_seq
            if gap > 0:
                self.missed_batches += gap
                logger.warning("missed %d KV event batches (sequence %d, expected %d)", gap, seq, self._next_seq)
            else:
                # vLLM numbers batches from 0 per process: a new process publishes, its cache starts empty.
                self.publisher_restarts += 1
                self.clear()
        self._next_seq = seq + 1

    def clear(self) -> None:
        """Forget everything mirrored and pending (the engine's cache is known to be empty)."""
        self._pending.clear()
        self._cached.clear()

    def _mirror(self, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except KVEventDecodeError as error:
            logger.warning("undecodable KV event batch: %s", error)
            return
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._cached.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self._cached.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self._cached.clear()

    def take_kv_events(self) -> list[bytes]:
        """Batches received since the last call, as they came (payload frames)."""
        batches = list(self._pending)
        self._pending.clear()
        return batches

    def cached_block_hashes(self) -> list[int]:
        return list(self._cached)
