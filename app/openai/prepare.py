"""Turns an OpenAI request body into what routing and engines need, once, before any engine is called.

Two steps, so that admission can sit between them: `validate` (schema, model, refused options: cheap,
microseconds) and `prepare` (the prompt's tokens and block keys: the heavy part). A prompt that cannot
fit the context is refused from a bound on its length before it is tokenized, and large prompts are
tokenized off the event loop, so one huge body never stalls the requests around it. Every failure is
an APIError with the status a client can act on. Knows nothing of HTTP or Ray.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from pydantic import ValidationError

from app.kv.hashing import BlockHasher, get_hasher
from app.kv.text_keys import ApproximateBlockKeys, chat_key_text
from app.openai.errors import APIError, bad_request, invalid_field
from app.openai.models import ModelEntry, ModelRegistry, UnknownModelError
from app.protocol.engine import EngineRequest, SamplingParams
from app.protocol.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from app.tokenizer import LONG_TEXT_CHARS, PromptTokenizer, TemplateError

Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions



@dataclass
class ServedModel:
    name: str
    tokenizer: PromptTokenizer | None
    """None: the servers tokenize (external servers without a configured tokenizer); prompts go to
    them as text and the router keys them by `text_keys` instead of the servers' block hashes."""
    engine: Any
    """What serves it: an engine client (engine-side OpenAI servers) or a relay client (the gateway)."""
    max_model_len: int
    block_size: int
    hasher: BlockHasher = field(default_factory=get_hasher)
    """The engines' block-hash function, so the router's keys equal the engines' own."""
    aliases: tuple[str, ...] = ()
    include_prompt_text: bool = False
    """Send the prompt text along (only Ray's PrefixCacheAffinityRouter baseline reads it)."""
    created: int = field(default_factory=lambda: int(time.time()))
    text_keys: ApproximateBlockKeys | None = None
    engine_model_name: str | None = None
    """The name the engines know the model by, when it differs from `name`."""

    def __post_init__(self) -> None:
        if self.tokenizer is None and self.text_keys is None:
            raise ValueError(f"model {self.name!r} has no tokenizer: give the text_keys its router keys on")

    @property
    def approximate_keys(self) -> bool:
        return self.tokenizer is None

    @property
    def served_name(self) -> str:
        return self.engine_model_name or self.name

    @cached_property
    def max_chars_per_token(self) -> int:
        """No token covers more characters than this, so a text of n characters has at least
        n / this many tokens: the bound that refuses an oversized prompt before tokenizing it. Twice
        the longest token, because a normalizer may compose characters before tokenizing."""
        return 2 * self.tokenizer.max_token_chars if self.tokenizer is not None else 64


@dataclass
class Validated:
    """A request that passed the cheap checks: its schema, its model, the options it uses."""

    endpoint: Endpoint
    body: dict[str, Any]
    request: ChatCompletionRequest | CompletionRequest
    model: ServedModel


@dataclass
class PreparedRequest:
    endpoint: Endpoint
    model: ServedModel
    engine_request: EngineRequest
    include_usage: bool
    body: dict[str, Any] = field(default_factory=dict)
    """The client's body as it arrived (validated)."""
    stream: bool = False
    wants_logprobs: bool = False
    return_token_ids: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def request_id(self) -> str:
        return self.engine_request.request_id


KeyFallback = Callable[[str, str], None]
"""Told (model, reason) when a request's prefix keys cannot be computed exactly and it is routed on load."""


class RequestPreparer:
    """Validation, model resolution, tokenization and routing keys for a set of served models.

    `forwards_bodies`: the gateway's mode. The client's body goes to the engine, which decides what it
    can do (tools, structured outputs, n, echo, images ...), so nothing is refused here for want of
    support; a request whose prompt the gateway cannot render as the engine will (images, tool calls in
    the conversation) is routed on load, never on keys that may be wrong, and `on_key_fallback` hears of
    it. Otherwise (an engine's own server), what the in-process engine cannot do is refused, naming it.
    """

    def __init__(
        self, models: Sequence[ServedModel], *, forwards_bodies: bool = False,
        on_key_fallback: KeyFallback | None = None,
    ) -> None:
        self.models = {model.name: model for model in models}
        self._registry = ModelRegistry(ModelEntry(m.name, m.aliases) for m in models)
        self.forwards_bodies = forwards_bodies
        self._on_key_fallback = on_key_fallback

    def model_list(self) -> ModelList:
        return ModelList(data=[
            ModelCard(id=m.name, created=m.created, max_model_len=m.max_model_len, aliases=list(m.aliases))
            for m in self.models.values()
        ])

    async def tokenize(self, body: Any) -> TokenizeResponse:
        """vLLM's `/tokenize`, answered with the model's tokenizer here (its chat template for `messages`)."""
        request = self._parse(TokenizeRequest, body)
        model, tokenizer = self._tokenizer_of(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("send either `prompt` or `messages`", param="prompt")
        if request.messages is not None:
            messages = _text_messages(request.messages)
            self._check_bound(model, sum(len(m["content"]) for m in messages), "messages")
            tools, generation = request.tools, request.add_generation_prompt
            tokens = await _tokenize(lambda: _chat_prompt(model, messages, tools, generation), _chars(messages))
        else:
            text = request.prompt or ""
            self._check_bound(model, len(text), "prompt")
            add = request.add_special_tokens
            tokens = await _tokenize(lambda: tokenizer.encode(text, add_special_tokens=add), len(text))
        return TokenizeResponse(count=len(tokens), max_model_len=model.max_model_len, tokens=tokens)

    def detokenize(self, body: Any) -> DetokenizeResponse:
        request = self._parse(DetokenizeRequest, body)
        _, tokenizer = self._tokenizer_of(request.model)
        vocab = tokenizer.vocab_size
        bad = next((token for token in request.tokens if not 0 <= token < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (size {vocab})", param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens, skip_special_tokens=False))

    @staticmethod
    def _parse(request_type: Any, body: Any) -> Any:
        try:
            return request_type.model_validate(body)
        except ValidationError as error:
            raise invalid_field(error.errors()) from None

    def _tokenizer_of(self, requested: str) -> tuple[ServedModel, PromptTokenizer]:
        model = self.resolve(requested)
        if model.tokenizer is None:
            raise bad_request(f"model {model.name!r} has no tokenizer at the gateway (its servers tokenize for "
                              "themselves); ask them", param="model")
        return model, model.tokenizer

    def resolve(self, requested: str) -> ServedModel:
        try:
            return self.models[self._registry.resolve(requested)]
        except UnknownModelError as error:
            raise APIError(
                404,
                f"The model {error.requested!r} does not exist. Served models: {', '.join(error.available)}.",
                param="model",
                code="model_not_found",
            ) from None

    def validate(self, endpoint: Endpoint, body: Any) -> Validated:
        request_type = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
        try:
            request = request_type.model_validate(body)
        except ValidationError as error:
            raise invalid_field(error.errors()) from None
        model = self.resolve(request.model)
        if isinstance(request, ChatCompletionRequest) and request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        if not self.forwards_bodies:
            if isinstance(request, ChatCompletionRequest):
                _reject_unsupported_chat(request)
            else:
                _reject_unsupported_completion(request)
            if request.n != 1:
                raise bad_request("this engine generates one choice per request (n=1); serve the model with vLLM "
                                  "for n > 1, or send one request per choice", param="n")
        return Validated(endpoint, body, request, model)

    async def prepare(self, validated: Validated) -> PreparedRequest:
        """Tokens, keys and the engine request (tokenizing off the loop when the prompt is long)."""
        endpoint, model, request = validated.endpoint, validated.model, validated.request
        messages: list[dict[str, str]] | None = None
        text: str | None = None
        unrenderable: str | None = None
        if isinstance(request, ChatCompletionRequest):
            unrenderable = _unrenderable(validated.body) if self.forwards_bodies else None
            messages = _text_messages(request.messages, refuse_other_parts=unrenderable is None)
            if unrenderable is not None:
                self._key_fallback(model, unrenderable)
                prompt = []
            elif model.tokenizer is not None:
                self._check_bound(model, sum(len(m["content"]) for m in messages), "messages")
                tools = request.tools
                prompt = await _tokenize(lambda: _chat_prompt(model, messages, tools), _chars(messages))
            else:
                prompt = []
            max_tokens = request.max_completion_tokens or request.max_tokens
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
        else:
            completion_prompt = await self._completion_prompt(model, request.prompt)
            prompt, text = ([], completion_prompt) if isinstance(completion_prompt, str) else (completion_prompt, None)
            max_tokens = request.max_tokens or (
                DEFAULT_COMPLETION_MAX_TOKENS if text is not None
                else min(DEFAULT_COMPLETION_MAX_TOKENS, max(model.max_model_len - len(prompt), 1))
            )
            logprobs = request.logprobs
        if unrenderable is not None:
            # The engine renders it; it checks the length too.
            block_hashes, estimate, chat_messages = [], None, None
        elif prompt or model.tokenizer is not None:
            max_tokens = _check_length(model, len(prompt), max_tokens)
            block_hashes = model.hasher.block_hashes(prompt, model.block_size)
            estimate, chat_messages = None, None
        else:
            # The servers tokenize: they check the length, and the router keys on the text.
            assert model.text_keys is not None
            key_text = chat_key_text(messages or []) if text is None else text
            block_hashes = model.text_keys.block_keys(key_text)
            estimate = model.text_keys.estimate_tokens(key_text)
            chat_messages = messages  # None for a completion: its text goes as `prompt`
        engine_request = EngineRequest(
            request_id=f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            model=model.name,
            prompt_token_ids=prompt,
            block_hashes=block_hashes,
            chat_messages=chat_messages,
            prompt_tokens_estimate=estimate,
            prompt=text if text is not None else (_prompt_text(request) if model.include_prompt_text else None),
            sampling=SamplingParams(
                max_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stop=request.stop_strings,
                stop_token_ids=request.stop_token_ids or [],
                ignore_eos=request.ignore_eos,
                logprobs=logprobs,
            ),
            priority=request.priority,
            kv_transfer_params=request.kv_transfer_params,
        )
        return PreparedRequest(
            endpoint, model, engine_request, include_usage=request.include_usage, body=validated.body,
            stream=request.stream, wants_logprobs=logprobs is not None,
            return_token_ids=endpoint == "completions" and request.return_token_ids,
        )

    async def _completion_prompt(
        self, model: ServedModel, prompt: str | list[int] | list[str] | list[list[int]]
    ) -> list[int] | str:
        """Token ids, or the text itself when the servers tokenize (no tokenizer here)."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if model.tokenizer is None:
                if not prompt:
                    raise bad_request("the prompt is empty", param="prompt")
                return prompt
            self._check_bound(model, len(prompt), "prompt")
            tokenizer = model.tokenizer
            return await _tokenize(lambda: tokenizer.encode(prompt), len(prompt))
        if not prompt:
            raise bad_request("the prompt is empty", param="prompt")
        if not all(isinstance(token, int) for token in prompt):
            raise bad_request(
                "batched prompts are not supported; send one request per prompt", param="prompt"
            )
        if model.tokenizer is None:
            return list(prompt)  # type: ignore[arg-type]  # the server checks its vocabulary
        vocab = model.tokenizer.vocab_size
        bad = next((token for token in prompt if not 0 <= token < vocab), None)  # type: ignore[operator]
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (size {vocab})", param="prompt")
        return list(prompt)  # type: ignore[arg-type]

    def _key_fallback(self, model: ServedModel, reason: str) -> None:
        if self._on_key_fallback is not None:
            self._on_key_fallback(model.name, reason)

    @staticmethod
    def _check_bound(model: ServedModel, num_chars: int, param: str) -> None:
        """Refuse a prompt that cannot fit the context whatever its tokens, without tokenizing it."""
        at_least = -(-num_chars // model.max_chars_per_token)
        if at_least >= model.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {model.max_model_len} tokens. However, your prompt "
                f"has at least {at_least} tokens ({num_chars} characters). Please shorten the prompt.",
                param=param,
                code="context_length_exceeded",
            )


def _chars(messages: list[dict[str, str]]) -> int:
    return sum(len(message["content"]) for message in messages)


async def _tokenize(encode: Any, num_chars: int) -> list[int]:
    # A long text is tokenized by the tokenizer's batch call, which releases the GIL: in a worker thread
    # it costs the event loop nothing while other requests are being served.
    if num_chars <= LONG_TEXT_CHARS:
        return encode()
    return await asyncio.to_thread(encode)


def _chat_prompt(
    model: ServedModel, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    assert model.tokenizer is not None
    try:
        return model.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    except TemplateError as error:
        raise bad_request(f"the chat template rejected the messages: {error}", param="messages") from None


def _check_length(model: ServedModel, num_prompt_tokens: int, max_tokens: int | None) -> int:
    limit = model.max_model_len
    if num_prompt_tokens >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{num_prompt_tokens} tokens. Please shorten the prompt.",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return limit - num_prompt_tokens
    if num_prompt_tokens + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def _unrenderable(body: dict[str, Any]) -> str | None:
    """Why the gateway cannot render this chat's prompt as the engine will, or None if it can.

    The gateway renders role and text content (and the tool definitions) through the model's chat
    template, as vLLM does; images and other parts become tokens only the engine knows, and tool calls
    and their results in the conversation are reshaped by the engine before its template sees them.
    """
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            return "content_parts"
        if message.get("role") == "tool" or message.get("tool_calls") or "tool_call_id" in message:
            return "tool_messages"
    return None


def _text_messages(messages: list[ChatMessage], *, refuse_other_parts: bool = True) -> list[dict[str, str]]:
    """The conversation as role/content strings (text parts joined); other parts are refused, or (when the
    engine renders the prompt itself) left out."""
    rendered: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            for part in content:
                if (part.type != "text" or part.text is None) and refuse_other_parts:
                    raise bad_request(
                        f"messages[{index}]: content parts of type {part.type!r} are not supported; "
                        "this model takes text only",
                        param=f"messages.{index}.content",
                    )
            content = "\n".join(part.text or "" for part in content if part.type == "text")
        rendered.append({"role": message.role, "content": content or ""})
    return rendered


def _reject_unsupported_chat(request: ChatCompletionRequest) -> None:
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    if request.tools:
        raise bad_request("this engine does no tool calling; serve the model with vLLM for tools", param="tools")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise bad_request("this engine has no structured outputs (response_format type 'text' only); serve "
                          "the model with vLLM for them", param="response_format")


def _reject_unsupported_completion(request: CompletionRequest) -> None:
    if request.echo:
        raise bad_request("this engine does not echo prompts; serve the model with vLLM for echo", param="echo")
    if request.suffix:
        raise bad_request("this engine takes no suffix", param="suffix")
    if request.best_of not in (None, 1):
        raise bad_request("this engine generates one sequence per request (best_of=1)", param="best_of")


def _prompt_text(request: ChatCompletionRequest | CompletionRequest) -> str:
    """The text Ray's PrefixCacheAffinityRouter matches on: the prompt, or the messages' contents."""
    if isinstance(request, CompletionRequest):
        return request.prompt if isinstance(request.prompt, str) else ""
    parts: list[str] = []
    for message in request.messages:
        content = message.content
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(getattr(part, "text", "") or "" for part in content)
    return "".join(parts)
