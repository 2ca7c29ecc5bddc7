"""An engine's server-sent events, passed on to the client as bytes.

The engine already speaks the client's dialect (a chat stream for a chat, a completion stream for a
completion), so the gateway does not rebuild the stream: it frames the bytes into whole events,
rewrites the model name where the engine knows the model by another name, drops the usage the
client did not ask for, and reads only what it must know itself (when the first output came, the
final usage, an error) without parsing the token events in between.
"""

from __future__ import annotations

import json
from typing import Any

_DONE = b"data: [DONE]"
_USAGE = b'"usage":{'
_USAGE_SPACED = b'"usage": {'
_NULL_USAGE = (b',"usage":null', b', "usage": null')
_ERROR = b'"error"'


def model_renames(engine_name: str, client_name: str) -> list[tuple[bytes, bytes]]:
    """Byte replacements that turn the engine's model name into the client's, in compact and spaced JSON.

    A JSON string value cannot hold an unescaped quote, so `"model":"x"` only ever matches the key.
    """
    if engine_name == client_name:
        return []
    old, new = json.dumps(engine_name).encode(), json.dumps(client_name).encode()
    return [(b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new)]


def event_data(event: bytes) -> bytes | None:
    """The data of one event (its `data:` lines joined), or None for a comment-only event."""
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)


# The Responses API's stream: typed events, ended by one of these instead of [DONE].
_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def carries_output(chunk: dict[str, Any]) -> bool:
    """Whether a chunk holds generated output, as opposed to the opening role-only chunk of a chat (or
    the created / in-progress events of a response)."""
    kind = chunk.get("type")
    if isinstance(kind, str) and "choices" not in chunk:
        return kind.endswith(".delta") or kind in _RESPONSE_ENDS
    for choice in chunk.get("choices") or ():
        if choice.get("finish_reason") is not None or choice.get("text") or choice.get("token_ids"):
            return True
        delta = choice.get("delta") or {}
        if any(value for key, value in delta.items() if key != "role"):
            return True
    return False


class EventRelay:
    """Frames one response's events and passes them on; notes the first output, usage, errors, the end."""

    def __init__(self, *, renames: list[tuple[bytes, bytes]] | None = None, keep_usage: bool = True) -> None:
        self._renames = renames or []
        self._keep_usage = keep_usage
        self._rest = b""
        self._separator = b"\n\n"
        self._checked_separator = False
        self.first_output = False
        """A chunk with generated output has been seen (the first token, or an empty finish)."""
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        """The last error event's `error` object, if the engine sent one."""
        self.done = False
        """`data: [DONE]` has been seen: the engine finished the stream normally."""

    def feed(self, data: bytes) -> bytes:
        """The complete events among what has arrived, ready for the client (b"" until one is whole)."""
        buffer = self._rest + data if self._rest else data
        if not self._checked_separator:
            # Servers end events with a blank line, "\n\n" or "\r\n\r\n": the first one seen decides.
            crlf, lf = buffer.find(b"\r\n\r\n"), buffer.find(b"\n\n")
            if crlf >= 0 and (lf < 0 or crlf < lf):
                self._separator, self._checked_separator = b"\r\n\r\n", True
            elif lf >= 0:
                self._checked_separator = True
        end = buffer.rfind(self._separator)
        if end < 0:
            self._rest = buffer
            return b""
        end += len(self._separator)
        block, self._rest = buffer[:end], buffer[end:]
        return self._pass(block)

    def flush(self) -> bytes:
        """Whatever is left at the end of the stream (an unterminated last event)."""
        rest, self._rest = self._rest, b""
        return self._pass(rest + self._separator) if rest.strip() else b""

    def _pass(self, block: bytes) -> bytes:
        if not self.first_output or _USAGE in block or _USAGE_SPACED in block or _ERROR in block:
            block = self._inspect(block)
        elif _DONE in block:
            self.done = True
        for old, new in self._renames:
            block = block.replace(old, new)
        if not self._keep_usage:
            for null_usage in _NULL_USAGE:
                block = block.replace(null_usage, b"")
        return block

    def _inspect(self, block: bytes) -> bytes:
        """Read the block event by event (only until the first output, and for usage and errors)."""
        kept: list[bytes] = []
        dropped = False
        for event in block.split(self._separator):
            if not event:
                continue
            data = event_data(event)
            if data is None:
                kept.append(event)
                continue
            if data == b"[DONE]":
                self.done = True
                kept.append(event)
                continue
            needed = not self.first_output or _USAGE in data or _USAGE_SPACED in data or _ERROR in data
            chunk = _loads(data) if needed else None
            if chunk is None:
                kept.append(event)
                continue
            kind = chunk.get("type")
            error = chunk.get("error") or (chunk if kind == "error" else None)
            response = chunk.get("response") if kind in _RESPONSE_ENDS else None
            if isinstance(response, dict):
                self.done = True
                error = error or response.get("error")
            if error:
                self.error = error if isinstance(error, dict) else {"message": str(error)}
            elif not self.first_output and carries_output(chunk):
                self.first_output = True
            usage = chunk.get("usage") or (response or {}).get("usage")
            if isinstance(usage, dict):
                self.usage = chat_usage(usage)
                if not self._keep_usage and not chunk.get("choices"):
                    dropped = True
                    continue  # the usage-only chunk the client did not ask for
            kept.append(event)
        if not dropped:
            return block
        return b"".join(event + self._separator for event in kept)


def chat_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Usage in chat's terms (prompt and completion tokens), from a chat's or a response's."""
    if "input_tokens" not in usage:
        return usage
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0
    return {"prompt_tokens": usage.get("input_tokens") or 0, "completion_tokens": usage.get("output_tokens") or 0,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
