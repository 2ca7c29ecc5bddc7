"""One request forwarded to one engine server, and the server's answer relayed back as bytes.

The gateway tokenizes to route but forwards the client's own body (with the few fields it must set),
so the engine renders the chat, parses tools and constrains output itself, and its answer is already
what the client expects. An answer is handed back only once the engine has accepted the request: a
stream after its first output (or an error the engine sent before it), a whole answer once complete.
So a refusal before generation (overload, an unsupported option) becomes an HTTP status, and a failure
before any output can still go to another server; only failures after the first token arrive in-band.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from app.gateway.sse import EventRelay, chat_usage, model_renames
from app.protocol.engine import EngineUnavailableError
from app.protocol.server_errors import refusal, stream_error
from app.upstream import UpstreamError, UpstreamPool

SSE_MEDIA_TYPE = "text/event-stream"
JSON_MEDIA_TYPE = "application/json"


@dataclass
class ForwardedCall:
    """What goes to an engine server: an OpenAI route and body, and how to read the answer."""

    path: str
    """`/v1/chat/completions` or `/v1/completions`: the client's own route."""
    body: dict[str, Any]
    """The client's body with the gateway's changes (the engine's model name, usage always on)."""
    client_model: str
    """The model name the client's answer carries."""
    engine_model: str
    """The model name the engine answers with."""
    keep_usage: bool = True
    """Whether the client asked for the usage chunk of a stream (the gateway always asks the engine)."""
    _payload: bytes | None = field(default=None, repr=False)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    def payload(self) -> bytes:
        if self._payload is None:
            self._payload = json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode()
        return self._payload

    def with_body(self, **changes: Any) -> ForwardedCall:
        """The same call with body fields changed (a None value removes the field)."""
        body = {**self.body, **changes}
        return ForwardedCall(self.path, {k: v for k, v in body.items() if v is not None}, self.client_model,
                             self.engine_model, self.keep_usage)

    def renames(self) -> list[tuple[bytes, bytes]]:
        return model_renames(self.engine_model, self.client_model)


class EngineReply:
    """An engine's accepted answer, on its way to the client.

    `first` holds the bytes ready now (a stream's events up to its first output, or a whole JSON
    answer); `rest()` yields the remaining stream. Always `close()` it: that ends the engine's
    request if the client stopped early, and runs the completion callbacks exactly once.
    """

    def __init__(
        self,
        *,
        replica_id: str,
        first: bytes,
        stream: bool,
        pieces: AsyncIterator[bytes] | None = None,
        relay: EventRelay | None = None,
        close: Callable[[], None] | None = None,
        usage: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.first = first
        self.stream = stream
        self.media_type = SSE_MEDIA_TYPE if stream else JSON_MEDIA_TYPE
        self.body = body
        """A whole answer's parsed JSON (for the handle API and the prefill hop)."""
        self._pieces = pieces
        self._relay = relay
        self._close = close
        self._usage = usage
        self.completed = not stream
        """The engine finished its answer (a stream reached [DONE])."""
        self._callbacks: list[Callable[[EngineReply], None]] = []
        self._closed = False

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._relay.usage if self._relay is not None else self._usage

    @property
    def error(self) -> dict[str, Any] | None:
        """An error event the engine sent after its first output (already relayed in-band)."""
        return self._relay.error if self._relay is not None else None

    def on_close(self, callback: Callable[[EngineReply], None]) -> None:
        self._callbacks.append(callback)

    async def rest(self) -> AsyncIterator[bytes]:
        """The rest of a stream, as events for the client. Raises EngineUnavailableError if the
        server fails before the stream's end (the client has part of an answer by then)."""
        if self._pieces is None or self._relay is None:
            return
        relay = self._relay
        try:
            async for piece in self._pieces:
                out = relay.feed(piece)
                if out:
                    yield out
        except UpstreamError as error:
            raise EngineUnavailableError(f"the engine server failed mid-answer: {error}") from None
        tail = relay.flush()
        if tail:
            yield tail
        if not relay.done:
            raise EngineUnavailableError("the engine server ended the stream before finishing it")
        self.completed = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._close is not None:
            self._close()
        for callback in self._callbacks:
            callback(self)


async def open_on_server(pool: UpstreamPool, base_url: str, call: ForwardedCall, replica_id: str) -> EngineReply:
    """Send `call` to one server and wait until it has accepted it (see the module's docstring).

    Raises EngineRequestRejected (the client's error), or EngineUnavailableError when the server cannot
    be reached or refuses before any output (the caller may try another server).
    """
    try:
        response = await pool.request(base_url, call.path, call.payload())
    except UpstreamError as error:
        raise EngineUnavailableError(f"cannot reach the engine server: {error}") from None
    return await accept(response.status, response.pieces(), call, replica_id, close=response.close)


async def accept(
    status: int, pieces: AsyncIterator[bytes], call: ForwardedCall, replica_id: str, *, close: Callable[[], None]
) -> EngineReply:
    """An engine's answer (its status, then its body as it arrives), read until it is accepted: the
    first output of a stream, or the whole of a non-streamed answer. `close` abandons it."""
    try:
        return await _accepted(status, pieces, call, replica_id, close)
    except BaseException:
        close()
        raise


async def _read(pieces: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in pieces])


async def _accepted(
    status: int, pieces: AsyncIterator[bytes], call: ForwardedCall, replica_id: str, close: Callable[[], None]
) -> EngineReply:
    try:
        if status != 200:
            raise refusal(status, await _read(pieces))
        if not call.stream:
            body = await _read(pieces)
            try:
                parsed = json.loads(body)
            except ValueError:
                raise EngineUnavailableError("the engine server sent an answer that is not JSON") from None
            for old, new in call.renames():
                body = body.replace(old, new, 1)
            usage = parsed.get("usage") if isinstance(parsed, dict) else None
            return EngineReply(replica_id=replica_id, first=body, stream=False, body=parsed, close=close,
                               usage=chat_usage(usage) if isinstance(usage, dict) else None)
        relay = EventRelay(renames=call.renames(), keep_usage=call.keep_usage)
        held: list[bytes] = []
        async for piece in pieces:
            out = relay.feed(piece)
            if relay.error is not None and not relay.first_output:
                raise stream_error(relay.error)
            if out:
                held.append(out)
            if relay.first_output or relay.done:
                break
        else:
            held.append(relay.flush())
            if relay.error is not None and not relay.first_output:
                raise stream_error(relay.error)
            if not relay.done:
                raise EngineUnavailableError("the engine server ended its answer before any output")
    except UpstreamError as error:
        raise EngineUnavailableError(f"the engine server failed before answering: {error}") from None
    return EngineReply(replica_id=replica_id, first=b"".join(held), stream=True, pieces=pieces, relay=relay,
                       close=close)
