"""An open-loop streaming load generator that costs little CPU: Poisson arrivals, keep-alive connections,
responses parsed by httptools in a raw asyncio protocol, nothing decoded but what finds the first token.

Used where the load generator shares a 2-core machine with what it measures, at rates (hundreds of
streamed requests a second) a Python HTTP client library could not drive without taking a core.
TTFT here is the time from sending a request to the first body bytes that carry generated text.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import numpy as np

_OUTPUT = re.compile(rb'"(?:content|text)":"[^"]')


@dataclass
class Result:
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    wall_s: float = 0.0
    sent: int = 0

    def summary(self) -> dict[str, float | int | str | None]:
        def pct(values: list[float], q: float) -> float:
            return float(np.percentile(values, q)) if values else float("nan")

        return {
            "sent": self.sent, "completed": len(self.e2e_s), "errors": self.errors, "first_error": self.first_error,
            "ttft_p50_ms": 1000 * pct(self.ttft_s, 50), "ttft_p90_ms": 1000 * pct(self.ttft_s, 90),
            "ttft_p99_ms": 1000 * pct(self.ttft_s, 99), "e2e_p50_ms": 1000 * pct(self.e2e_s, 50),
            "completed_per_s": len(self.e2e_s) / self.wall_s if self.wall_s else 0.0,
        }


class _Connection(asyncio.Protocol):
    def __init__(self, pool: list[_Connection]) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, result: Result) -> asyncio.Future[None]:
        self._result = result
        self._parser = httptools.HttpResponseParser(self)
        self._started = time.perf_counter()
        self._first: float | None = None
        self._done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self._done

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(f"bad HTTP: {error}")
            self.transport.close()  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        if self._first is None and _OUTPUT.search(body):
            self._first = time.perf_counter()

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        now = time.perf_counter()
        if status == 200 and self._first is not None:
            self._result.ttft_s.append(self._first - self._started)
            self._result.e2e_s.append(now - self._started)
        else:
            self._fail(f"HTTP {status}")
        done, self._done = self._done, None
        if self._parser.should_keep_alive() and not self.closed:
            self._pool.append(self)
        if done is not None and not done.done():
            done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and not self._done.done():
            self._fail(f"connection lost: {exc}")
            self._done.set_result(None)

    def _fail(self, message: str) -> None:
        self._result.errors += 1
        self._result.first_error = self._result.first_error or message


def _requests(url: str, bodies: list[bytes]) -> tuple[str, int, list[bytes]]:
    """Where to connect, and each body as a whole HTTP/1.1 POST to the URL's path."""
    parts = urlsplit(url)
    requests = [b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (parts.path.encode(), parts.netloc.encode(), len(body), body) for body in bodies]
    return parts.hostname or "127.0.0.1", parts.port or 80, requests


async def run(url: str, bodies: list[bytes], rate: float, duration_s: float, *, seed: int = 0) -> Result:
    """Send `bodies` in turn to `url` (a full URL) at `rate` a second (Poisson) for `duration_s`."""
    host, port, requests = _requests(url, bodies)
    loop = asyncio.get_running_loop()
    pool: list[_Connection] = []
    result = Result()
    rng = random.Random(seed)
    pending: set[asyncio.Future[None]] = set()

    async def one(request: bytes) -> None:
        while pool:
            connection = pool.pop()
            if not connection.closed:
                break
        else:
            try:
                _, connection = await loop.create_connection(lambda: _Connection(pool), host, port)
            except OSError as error:
                result.errors += 1
                result.first_error = result.first_error or f"connect: {error}"
                return
        await connection.send(request, result)

    started = time.perf_counter()
    at = 0.0
    index = 0
    while at < duration_s:
        delay = started + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(requests[index % len(requests)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
        result.sent += 1
        index += 1
        at += rng.expovariate(rate)
    if pending:
        await asyncio.wait(pending)
    result.wall_s = time.perf_counter() - started
    for connection in pool:
        if connection.transport is not None:
            connection.transport.close()
    return result


async def closed(url: str, body: bytes, concurrency: int, duration_s: float) -> Result:
    """`concurrency` clients on keep-alive connections, each sending its next request when the previous
    answer is complete, for `duration_s`."""
    host, port, (request,) = _requests(url, [body])
    loop = asyncio.get_running_loop()
    result = Result()
    stop = time.perf_counter() + duration_s

    async def client() -> None:
        pool: list[_Connection] = []
        while time.perf_counter() < stop:
            connection = pool.pop() if pool and not pool[-1].closed else None
            if connection is None:
                _, connection = await loop.create_connection(lambda: _Connection(pool), host, port)
            result.sent += 1
            await connection.send(request, result)
        for connection in pool:
            if connection.transport is not None:
                connection.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - started
    return result
