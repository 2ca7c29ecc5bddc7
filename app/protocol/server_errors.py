"""What an OpenAI-compatible server's error means to whoever called it: the client's mistake, or the
server's trouble (worth another server), or its load.

One reading for every caller of engine servers: the gateway's relay and the vLLM engine's own client.
"""

from __future__ import annotations

import json
from typing import Any

from app.protocol.engine import EngineOverloaded, EngineRequestRejected, EngineUnavailableError

_OVERLOAD_CODES = (429, 503, "429", "503")


def error_message(status: int, body: bytes) -> tuple[str, str | None]:
    """The message and param of an OpenAI-style error body (or the body itself)."""
    try:
        error = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"]), error.get("param")
    # FastAPI's own 422s and other shapes: say what the server said.
    text = body.decode(errors="replace").strip()[:500]
    return text or f"HTTP {status}", None


def refusal(status: int, body: bytes) -> Exception:
    """The error for a server's non-200 answer: the client's (400), its load (429, 503), or its failure."""
    message, param = error_message(status, body)
    if status in (400, 422):
        return EngineRequestRejected(message, param=param)
    if status == 404:
        # The server lacks the route (an embedding model asked for a chat) or the model: trying the
        # model's other servers would only find the same.
        return EngineRequestRejected(f"the engine server has no answer for this request (HTTP 404: {message}); "
                                     "does this model serve this endpoint?", param="model")
    failure = EngineOverloaded if status in _OVERLOAD_CODES else EngineUnavailableError
    return failure(f"the engine server answered HTTP {status}: {message}")


def stream_error(error: Any) -> Exception:
    """An error a server sent inside its stream, as `refusal` reads a status."""
    if isinstance(error, dict):
        code = error.get("code")
        if error.get("type") in ("invalid_request_error", "BadRequestError") or code in (400, "400"):
            return EngineRequestRejected(str(error.get("message") or error), param=error.get("param"))
        failure = EngineOverloaded if code in _OVERLOAD_CODES else EngineUnavailableError
        return failure(f"the engine server failed the request: {error.get('message') or error}")
    return EngineUnavailableError(f"the engine server failed the request: {error}")
