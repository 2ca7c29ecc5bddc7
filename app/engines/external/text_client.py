"""Calls an OpenAI-compatible server that tokenizes for itself (the gateway has no tokenizer).

With the model's tokenizer the gateway sends token ids to /v1/completions (app/engines/vllm/client.py).
Without it, the request goes out as the client wrote it: a chat's messages to /v1/chat/completions,
where the server applies its own chat template, and a completion's text to /v1/completions. Only
standard OpenAI fields are sent unless the client asked for a vLLM extension, so any compatible
server can take it. Token counts come from the server's usage chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from app.engines.protocol import EngineOutput, EngineRequest, TokenLogprob, TopLogprob, merge_outputs
from app.engines.vllm.client import choice_output, completion_output, set_fields, stream_openai


def text_body(request: EngineRequest, served_model_name: str) -> dict[str, Any]:
    s = request.sampling
    chat = request.chat_messages is not None
    body: dict[str, Any] = {
        "model": request.lora_name or served_model_name,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
        **set_fields(request),
    }
    if chat:
        body["messages"] = request.chat_messages
    else:
        body["prompt"] = request.prompt_token_ids or request.prompt or ""
    if s.logprobs is not None:
        body.update({"logprobs": True, "top_logprobs": s.logprobs} if chat else {"logprobs": s.logprobs})
    return body


def _chat_logprobs(raw: dict[str, Any] | None) -> list[TokenLogprob] | None:
    if not raw or raw.get("content") is None:
        return None
    return [
        TokenLogprob(
            token=entry.get("token", ""),
            logprob=entry["logprob"] if entry.get("logprob") is not None else float("-inf"),
            top_logprobs=[TopLogprob(token=top.get("token", ""), logprob=top.get("logprob", float("-inf")))
                          for top in entry.get("top_logprobs") or []],
        )
        for entry in raw["content"]
    ]


def chat_output(request_id: str, choice: dict[str, Any]) -> EngineOutput:
    delta = choice.get("delta") or choice.get("message") or {}
    return choice_output(request_id, choice, delta.get("content") or "", _chat_logprobs(choice.get("logprobs")))


class OpenAITextClient:
    """One server's chat and completions endpoints, prompts sent as text."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, served_model_name: str) -> None:
        self._client = client
        self._base_url = base_url
        self._model = served_model_name

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """The request's outputs as the server streams them; the last carries the usage counts."""
        request_id = request.request_id
        if request.chat_messages is not None:
            url = f"{self._base_url}/v1/chat/completions"

            def parse(choice: dict[str, Any]) -> EngineOutput:
                return chat_output(request_id, choice)
        else:
            url = f"{self._base_url}/v1/completions"

            def parse(choice: dict[str, Any]) -> EngineOutput:
                return completion_output(request_id, choice)
        body = text_body(request, self._model)
        async for output in stream_openai(self._client, url, body, parse, count_output=True):
            # Chat streams open with an empty role delta: nothing generated yet, nothing to pass on.
            if output.text or output.finished or output.logprobs or output.token_ids:
                yield output

    async def complete(self, request: EngineRequest) -> EngineOutput:
        return merge_outputs([output async for output in self.stream(request)])
