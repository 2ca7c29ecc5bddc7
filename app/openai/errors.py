"""OpenAI-style errors: one exception type that knows its HTTP status and JSON body.

Raised anywhere below the HTTP layer; the HTTP layer renders it, and Serve handle callers catch
it by type (it pickles across processes).
"""

from __future__ import annotations

import json
import re
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


def json_body(raw: bytes | bytearray, content_type: bytes | str | None = None) -> object:
    """A request body as JSON, read as OpenAI reads it, or the 400 that says why it is not: UTF-8 only, a
    JSON Content-Type when one is given, no NaN or Infinity, no lone UTF-16 surrogates in strings."""
    if content_type is not None and not _is_json_media_type(content_type):
        shown = content_type.decode(errors="replace") if isinstance(content_type, bytes) else content_type
        raise bad_request(f"the request body must be JSON, sent with Content-Type: application/json (got {shown!r})")
    if not raw:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as error:
        raise bad_request(f"the request body is not UTF-8 (byte {error.start}); send JSON encoded as UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply to be a request") from None
    except ValueError as error:  # NaN or Infinity
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    if _SURROGATE_ESCAPE.search(text) is not None:
        try:
            where = _lone_surrogate(body, "")
        except RecursionError:
            raise bad_request("the request body is nested too deeply to be a request") from None
        if where is not None:
            raise bad_request(f"{where or 'the body'}: the text holds a lone UTF-16 surrogate (an unpaired "
                              "\\ud800-\\udfff escape), which is not a character", param=where or None)
    return body


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _is_json_media_type(content_type: bytes | str) -> bool:
    value = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media in ("", "*/*")


def _lone_surrogate(value: object, path: str) -> str | None:
    """The path of the first string (value or key) holding a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            found = _lone_surrogate(key, where)
            if found is None:
                found = _lone_surrogate(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


def invalid_field(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """A 400 naming the first invalid field, from pydantic-style error entries (loc, msg)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = tuple(first["loc"])
    # A field that takes one of several types: pydantic tells each member's complaint, under the
    # member's name (`prompt.str`, `prompt.list[int].0`); say once which types the field takes.
    tag_at = next((i for i, part in enumerate(loc) if _is_type_tag(part)), None)
    if tag_at is not None:
        field = loc[:tag_at]
        tags = list(dict.fromkeys(
            str(e["loc"][tag_at]) for e in errors
            if tuple(e["loc"][:tag_at]) == field and len(e["loc"]) > tag_at and _is_type_tag(e["loc"][tag_at])
        ))
        name = ".".join(str(part) for part in field)
        if len(tags) > 1:
            return bad_request(f"{name}: invalid type; expected one of {', '.join(tags)}", param=name or None)
        loc = field + loc[tag_at + 1:]
    location = ".".join(str(part) for part in loc)
    return bad_request(f"{location}: {first['msg']}" if location else first["msg"], param=location or None)


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict") or "[" in part)
