"""Sends engine requests to a vLLM OpenAI server and turns its answers into EngineOutputs.

The gateway has already applied the chat template and tokenized, so every request goes to
`/v1/completions` with the prompt as token ids: the engine computes exactly the tokens the router
hashed, and one code path serves chat and completions. Stop strings, detokenization and logprobs
stay vLLM's own. The final output waits for the usage chunk, because vLLM reports cached prompt
tokens only there.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from app.protocol.engine import (
    EngineOutput,
    EngineRequest,
    EngineUnavailableError,
    TokenLogprob,
    TopLogprob,
)
from app.protocol.server_errors import refusal, stream_error
from app.tokenizer import PromptTokenizer


def set_fields(request: EngineRequest) -> dict[str, Any]:
    """The request's options that are set, as OpenAI/vLLM body fields (unset ones are left out, so
    the server applies its own defaults and servers without vLLM's extensions are not sent them)."""
    s = request.sampling
    fields = {
        "max_tokens": s.max_tokens,
        "seed": s.seed,
        "stop": s.stop or None,
        "stop_token_ids": s.stop_token_ids or None,
        "ignore_eos": s.ignore_eos or None,
        "priority": request.priority or None,  # vLLM refuses a priority unless it schedules by priority
        "cache_salt": request.cache_salt,
    }
    return {key: value for key, value in fields.items() if value is not None}


def completion_body(request: EngineRequest, served_model_name: str, *, stream: bool) -> dict[str, Any]:
    s = request.sampling
    body: dict[str, Any] = {
        "model": request.lora_name or served_model_name,
        "prompt": request.prompt_token_ids,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "stream": stream,
        "return_token_ids": True,
        **set_fields(request),
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if s.logprobs is not None:
        # Alternatives keyed by id, not by text: different tokens may decode to the same text.
        body.update(logprobs=s.logprobs, return_tokens_as_token_ids=True)
    if request.kv_transfer_params is not None:
        body["kv_transfer_params"] = request.kv_transfer_params
    return body


TokenDecoder = Callable[[int], str]


def token_text(tokenizer: PromptTokenizer | None, token_id: int) -> str:
    """One token's text for logprobs (vLLM's own form when no tokenizer is at hand)."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _token(key: str, decode: TokenDecoder | None) -> tuple[str, int | None]:
    """vLLM writes `token_id:123` with return_tokens_as_token_ids; the text comes from the tokenizer."""
    if key.startswith("token_id:"):
        token_id = int(key[9:])
        return (decode(token_id) if decode else key), token_id
    return key, None


def _logprobs(choice: dict[str, Any], decode: TokenDecoder | None) -> list[TokenLogprob] | None:
    raw = choice.get("logprobs")
    if not raw:
        return None
    tops = raw.get("top_logprobs") or []
    out = []
    for i, (key, logprob) in enumerate(zip(raw.get("tokens") or [], raw.get("token_logprobs") or [], strict=False)):
        token, token_id = _token(key, decode)
        alternatives = []
        for top_key, top_logprob in (tops[i] if i < len(tops) and tops[i] else {}).items():
            top_token, top_id = _token(top_key, decode)
            alternatives.append(TopLogprob(token=top_token, logprob=top_logprob, token_id=top_id))
        out.append(TokenLogprob(
            token=token, token_id=token_id, logprob=logprob if logprob is not None else float("-inf"),
            top_logprobs=alternatives,
        ))
    return out


def choice_output(
    request_id: str, choice: dict[str, Any], text: str, logprobs: list[TokenLogprob] | None
) -> EngineOutput:
    """One streamed choice (chat or completion) with its text and logprobs already read."""
    return EngineOutput(
        request_id=request_id,
        token_ids=list(choice.get("token_ids") or []),
        text=text,
        finish_reason=choice.get("finish_reason"),
        stop_reason=choice.get("stop_reason"),
        logprobs=logprobs,
    )


def completion_output(request_id: str, choice: dict[str, Any], decode: TokenDecoder | None = None) -> EngineOutput:
    return choice_output(request_id, choice, choice.get("text") or "", _logprobs(choice, decode))


def _with_usage(output: EngineOutput, usage: dict[str, Any] | None, *, count_output: bool = False) -> EngineOutput:
    if not usage:
        return output
    details = usage.get("prompt_tokens_details") or {}
    output.num_prompt_tokens = int(usage.get("prompt_tokens") or 0)
    output.num_cached_tokens = int(details.get("cached_tokens") or 0)
    if count_output:
        output.num_output_tokens = int(usage.get("completion_tokens") or 0)
    return output


ChoiceParser = Callable[[dict[str, Any]], EngineOutput]


async def stream_openai(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], parse_choice: ChoiceParser,
    *, count_output: bool = False,
) -> AsyncIterator[EngineOutput]:
    """An OpenAI server's streamed answer as EngineOutputs. The finishing output is held back for
    the usage chunk that follows it (cached and, with `count_output`, generated token counts)."""
    held: EngineOutput | None = None
    finished = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                raise refusal(response.status_code, await response.aread())
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    # Read on to the end of the body: a connection closed mid-body is not reused,
                    # and a new one per request costs a TCP handshake on the request path.
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    raise stream_error(chunk["error"])
                choices = chunk.get("choices") or []
                if not choices:  # the usage chunk, after the finishing one
                    if held is not None:
                        yield _with_usage(held, chunk.get("usage"), count_output=count_output)
                        held = None
                    continue
                output = parse_choice(choices[0])
                if output.finished:
                    held, finished = output, True
                    if chunk.get("usage"):  # some servers put usage on the finishing chunk itself
                        yield _with_usage(held, chunk["usage"], count_output=count_output)
                        held = None
                else:
                    yield output
    except httpx.TransportError as error:
        raise EngineUnavailableError(f"lost the connection to the server: {error!r}") from None
    if not finished:
        raise EngineUnavailableError("the server ended the stream before the request finished")
    if held is not None:  # no usage chunk came
        yield held


class VLLMCompletionsClient:
    """One vLLM server's completions endpoint."""

    def __init__(
        self, client: httpx.AsyncClient, base_url: str, served_model_name: str, *, decode: TokenDecoder | None = None
    ) -> None:
        self._client = client
        self._url = f"{base_url}/v1/completions"
        self._model = served_model_name
        self._decode = decode

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """The request's outputs as vLLM streams them; the last one has finish_reason and usage."""
        body = completion_body(request, self._model, stream=True)
        decode = self._decode
        async for output in stream_openai(
            self._client, self._url, body, lambda choice: completion_output(request.request_id, choice, decode)
        ):
            yield output

    async def complete(self, request: EngineRequest) -> EngineOutput:
        """The whole answer in one output, with the kv_transfer_params a prefill engine returns."""
        body = completion_body(request, self._model, stream=False)
        try:
            response = await self._client.post(self._url, json=body)
        except httpx.TransportError as error:
            raise EngineUnavailableError(f"lost the connection to the vLLM server: {error!r}") from None
        if response.status_code != 200:
            raise refusal(response.status_code, response.content)
        reply = response.json()
        choice = reply["choices"][0]
        output = _with_usage(completion_output(request.request_id, choice, self._decode), reply.get("usage"))
        output.kv_transfer_params = reply.get("kv_transfer_params")
        return output
