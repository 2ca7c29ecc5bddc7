"""What an engine's own server answers when a chat asks for a form: JSON for `response_format`, a tool
call for `tool_choice: "required"` or a named function.

vLLM constrains its sampling with a grammar; an engine without one (the simulated engine) answers with
a value made up from the schema instead (app/openai/json_sample.py), spread over the tokens the engine
generates, so the answer takes as long as the engine takes and is valid against the schema when the
engine is given enough tokens for it. Cut short by `max_tokens`, it is cut short, as vLLM's is.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from dataclasses import dataclass
from typing import Any

from app.openai.errors import bad_request
from app.openai.json_sample import UnsupportedSchema, sample_json
from app.protocol.openai import ChatCompletionRequest

# What `response_format: json_object` gets: an object, as OpenAI's JSON mode promises, with some content.
_JSON_OBJECT_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


@dataclass
class OutputForm:
    """The text one choice answers with, and how it is shaped."""

    text: str
    num_tokens: int
    """Tokens the text takes: the engine generates this many (or max_tokens, if fewer) for it."""
    tool_name: str | None = None
    """A tool call to this function, with `text` as its arguments; None: `text` is the content."""
    tool_call_id: str = ""
    finish_reason: str = "stop"
    """Why a complete answer ends: `tool_calls` when the model had to call a tool, as OpenAI says."""

    def upto(self, tokens: int) -> str:
        """The text the first `tokens` generated tokens cover."""
        if tokens >= self.num_tokens:
            return self.text
        return self.text[: len(self.text) * tokens // self.num_tokens]

    def finish(self, tokens: int, engine_reason: str | None) -> str | None:
        if engine_reason in ("stop", "length") and tokens >= self.num_tokens:
            return self.finish_reason
        return engine_reason


def output_form(request: ChatCompletionRequest, count_tokens: Any, rng: random.Random) -> OutputForm | None:
    """The form a chat asks for, or None for free text. `count_tokens(text)` gives a text's length in tokens."""
    tool_name, finish_reason = None, "stop"
    choice = request.tool_choice
    if request.tools and (choice == "required" or (choice is not None and not isinstance(choice, str))):
        if isinstance(choice, str):
            tool, finish_reason = request.tools[0], "tool_calls"
        else:
            tool = next(t for t in request.tools if t.function.name == choice.function.name)
        tool_name, schema, param = tool.function.name, tool.function.parameters or {"type": "object"}, "tools"
    elif request.response_format is not None and request.response_format.type == "json_object":
        schema, param = _JSON_OBJECT_SCHEMA, "response_format"
    elif request.response_format is not None and request.response_format.type == "json_schema":
        if request.response_format.json_schema is None:
            raise bad_request("response_format of type json_schema needs its `json_schema`", param="response_format")
        schema, param = request.response_format.json_schema.schema_, "response_format"
    elif request.response_format is not None and request.response_format.type != "text":
        raise bad_request(f"this engine knows response_format types text, json_object and json_schema, not "
                          f"{request.response_format.type!r}", param="response_format")
    else:
        return None
    try:
        text = json.dumps(sample_json(schema, rng), separators=(",", ":"))
    except UnsupportedSchema as error:
        raise bad_request(f"the schema cannot be satisfied here: {error}", param=param) from None
    return OutputForm(text=text, num_tokens=max(1, math.ceil(count_tokens(text))), tool_name=tool_name,
                      tool_call_id=f"chatcmpl-tool-{uuid.uuid4().hex[:16]}", finish_reason=finish_reason)
