"""OpenAI-style errors: one exception type that knows its HTTP status and JSON body.

Raised anywhere below the HTTP layer; the HTTP layer renders it, and Serve handle callers catch
it by type (it pickles across processes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

_DEFAULT_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the client can act on, with the status code and body OpenAI would send."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _DEFAULT_TYPES.get(status_code, "api_error")
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {
            "type": self.type,
            "param": self.param,
            "code": self.code,
            "retry_after_s": self.retry_after_s,
        }
        return (_rebuild, (self.status_code, self.message, kwargs))

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


def _rebuild(status_code: int, message: str, kwargs: dict[str, Any]) -> APIError:
    return APIError(status_code, message, **kwargs)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds the gateway's limit of {limit} bytes.", code="request_too_large")


def json_body(raw: bytes | bytearray) -> object:
    """A request body as JSON, or the 400 that says why it is not."""
    if not raw:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None


def invalid_field(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """A 400 naming the first invalid field, from pydantic-style error entries (loc, msg)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    location = ".".join(str(part) for part in first["loc"])
    return bad_request(f"{location}: {first['msg']}" if location else first["msg"], param=location or None)
