"""HTTP/1.1 to engine servers: keep-alive connections, response bodies handed over as they arrive.

Every streamed token crosses this client, so it is built for that: an asyncio protocol over httptools
(the C parser uvicorn uses), no per-request objects beyond the response, pieces that arrived together
handed over together. httpx parses HTTP in Python and aiohttp's client builds far more per request;
measured on a 64-token stream they cost 2-3 times this one's CPU (benchmarks/README.md, "The data
path"). One request at a time per connection; idle connections are kept per server and dropped
before a server's own keep-alive timeout could close them under a new request.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 256 * 1024
"""Bytes held for a slow reader before the socket stops being read (the server then waits too)."""


class UpstreamError(ConnectionError):
    """The server could not be reached, or the connection broke.

    `responded` says whether any of the response had arrived: if not, the server never answered and
    the request may be sent to another server; if so, part of an answer may already be out.
    """

    def __init__(self, message: str, *, responded: bool) -> None:
        super().__init__(message)
        self.responded = responded


class UpstreamConnectError(UpstreamError):
    """The server could not be reached at all (refused, unroutable, or too slow to accept)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, responded=False)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a server is: scheme, host and port, and the Host header it expects."""

    scheme: str
    host: str
    port: int
    host_header: bytes

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.netloc.encode())


class UpstreamResponse:
    """One response: status and headers first, then the body as it arrives."""

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self._loop = asyncio.get_running_loop()
        self._headers_ready: asyncio.Future[None] = self._loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._responded = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.error: UpstreamError | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case)."""
        return next((value for key, value in self.headers if key == name), None)

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([piece async for piece in self.pieces()])

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body in the pieces it arrived in (those that arrived together, joined). Raises
        UpstreamError if the connection breaks before the body is complete."""
        while True:
            if self._pieces:
                pieces = self._pieces
                data = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                self._buffered = 0
                if self._paused and self._connection is not None:
                    self._paused = False
                    self._connection.resume_reading()
                yield data
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    def close(self) -> None:
        """Stop reading. An unfinished response's connection is closed, which tells the server that
        the client has gone (vLLM aborts the request and frees its KV cache)."""
        connection, self._connection = self._connection, None
        if connection is not None and not self.complete:
            connection.abandon()

    # -- called by the connection --------------------------------------------------------------

    def _on_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.headers = status, headers
        if not self._headers_ready.done():
            self._headers_ready.set_result(None)

    def _on_body(self, data: bytes) -> None:
        self._responded = True
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self._connection is not None:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def _on_complete(self) -> None:
        self.complete = True
        self._connection = None
        self._wake()

    def _on_lost(self, error: UpstreamError) -> None:
        self.error = error
        self._connection = None
        if not self._headers_ready.done():
            self._headers_ready.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._response: UpstreamResponse | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._began = False

    def send(self, response: UpstreamResponse, request: bytes) -> None:
        self._response = response
        self._headers = []
        self._began = False
        self._parser = httptools.HttpResponseParser(self)
        assert self.transport is not None
        self.transport.write(request)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abandon(self) -> None:
        self._response = None
        if self.transport is not None:
            self.transport.close()

    # -- asyncio -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(f"the server sent malformed HTTP: {error}")
            self.abandon()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(f"the server closed the connection ({exc or 'no error'})")

    def _fail(self, message: str) -> None:
        response, self._response = self._response, None
        if response is not None:
            response._on_lost(UpstreamError(message, responded=self._began))

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._began = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._response is not None:
            self._response._on_headers(self._parser.get_status_code(), self._headers)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._on_body(body)

    def on_message_complete(self) -> None:
        response, self._response = self._response, None
        keep_alive = self._parser.should_keep_alive()
        if response is not None:
            response._on_complete()
        if keep_alive and not self.closed:
            self._pool._release(self)
        elif self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Connections to any number of servers, reused across requests."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        max_idle_per_server: int = 256,
        idle_ttl_s: float = 3.0,
    ) -> None:
        # idle_ttl_s stays under uvicorn's (and so vLLM's) 5 s keep-alive timeout.
        self.connect_timeout_s = connect_timeout_s
        self._max_idle = max_idle_per_server
        self._idle_ttl_s = idle_ttl_s
        self._idle: dict[Origin, list[_Connection]] = {}
        self._origins: dict[str, Origin] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def origin(self, base_url: str) -> Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin.parse(base_url)
        return origin

    async def request(
        self,
        base_url: str,
        path: str,
        body: bytes = b"",
        *,
        method: str = "POST",
        headers: Iterable[tuple[str, str]] = (),
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Send a request and return once the response's status and headers are in.

        Raises UpstreamError when the server cannot be reached or the connection breaks first. A kept
        connection the server closed just as it was reused is retried once on a new one, since the
        server never saw the request.
        """
        origin = self.origin(base_url)
        head = [f"{method} {path} HTTP/1.1\r\nHost: ".encode(), origin.host_header]
        if method != "GET" or body:
            head.append(b"\r\nContent-Type: application/json\r\nContent-Length: %d" % len(body))
        for name, value in headers:
            head.append(f"\r\n{name}: {value}".encode("latin-1"))
        head.append(b"\r\n\r\n")
        request = b"".join(head) + body
        for attempt in range(2):
            connection, reused = self._take_idle(origin), True
            if connection is None:
                connection, reused = await self._connect(origin), False
            response = UpstreamResponse(connection)
            connection.send(response, request)
            try:
                if timeout_s is None:
                    await response._headers_ready
                else:
                    async with asyncio.timeout(timeout_s):
                        await response._headers_ready
                return response
            except UpstreamError as error:
                if reused and not error.responded and attempt == 0:
                    continue
                raise
            except BaseException:  # cancelled, or timed out: the connection's state is unknown
                response.close()
                connection.abandon()
                raise
        raise AssertionError("unreachable")

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.scheme == "https":
            context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, origin), origin.host, origin.port, ssl=context
                )
        except (OSError, TimeoutError) as error:
            raise UpstreamConnectError(f"cannot connect to {origin.host}:{origin.port}: {error!r}") from None
        return connection

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        deadline = time.monotonic() - self._idle_ttl_s
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > deadline:
                return connection
            connection.abandon()
        return None

    def _release(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.origin, [])
        if self._closed or len(idle) >= self._max_idle:
            connection.abandon()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    def close(self) -> None:
        """Close every idle connection (those in use close when their responses end)."""
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.abandon()
        self._idle.clear()
