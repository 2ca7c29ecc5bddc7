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
from collections.abc import Callable, Mapping, Sequence
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
    EmbeddingRequest,
    ModelCard,
    ModelList,
    ResponsesRequest,
    TokenizeRequest,
    TokenizeResponse,
    tool_dicts,
)
from app.tokenizer import LONG_TEXT_CHARS, PromptTokenizer, TemplateError

Endpoint = Literal["chat", "completions", "embeddings", "responses"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
                                  "embeddings": "/v1/embeddings", "responses": "/v1/responses"}
_REQUEST_TYPES: dict[str, type[ChatCompletionRequest | CompletionRequest | EmbeddingRequest | ResponsesRequest]] = {
    "chat": ChatCompletionRequest, "completions": CompletionRequest, "embeddings": EmbeddingRequest,
    "responses": ResponsesRequest,
}
USAGE_CHUNK_ENDPOINTS = ("chat", "completions")
"""Endpoints whose streams carry usage only in a last chunk asked for by stream_options (the Responses API
puts it in its final event, embeddings do not stream)."""
_ID_PREFIXES = {"chat": "chatcmpl", "completions": "cmpl", "embeddings": "embd", "responses": "resp"}
# Characters per token when a text's tokens are only estimated (embeddings' load, at the gateway).
_CHARS_PER_TOKEN_ESTIMATE = 4
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
    ignored_fields: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    """Fields the engines would accept and ignore: refused unless they hold the value that means nothing."""
    adapter_of: str | None = None
    """For a LoRA adapter: the base model it runs on (its engines, its routing)."""
    adapter_path: str | None = None
    """For a LoRA adapter: where the engines read it, which they fold into their block hashes."""

    def __post_init__(self) -> None:
        if self.tokenizer is None and self.text_keys is None:
            raise ValueError(f"model {self.name!r} has no tokenizer: give the text_keys its router keys on")

    @property
    def adapter_name(self) -> str | None:
        return self.name if self.adapter_of is not None else None

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
    request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest | ResponsesRequest
    model: ServedModel


@dataclass
class PreparedRequest:
    endpoint: Endpoint
    model: ServedModel
    engine_request: EngineRequest
    include_usage: bool
    body: dict[str, Any] = field(default_factory=dict)
    """The client's body as it arrived (validated)."""
    request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest | None = None
    """The body as read (a Responses request, as the chat it amounts to)."""
    more_prompts: list[list[int]] = field(default_factory=list)
    """A batched completion's prompts after the first (an engine's own server only; the gateway
    forwards the batch as sent)."""
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
        self.models: dict[str, ServedModel] = {}
        self._registry = ModelRegistry(())
        self.set_models(models)
        self.split_lengths: dict[str, int] = {}
        """Traffic splits' names, listed as models too, with the shortest context of their targets (the
        gateway's splits set them)."""
        self.forwards_bodies = forwards_bodies
        self._on_key_fallback = on_key_fallback

    def set_models(self, models: Sequence[ServedModel]) -> None:
        """Serve these models from the next request on (raises ValueError if a name is used twice, and the
        models served stay). A request already resolved keeps the model it resolved to."""
        registry = ModelRegistry(ModelEntry(m.name, m.aliases) for m in models)
        self.models, self._registry = {model.name: model for model in models}, registry

    def served_names(self) -> list[str]:
        """Every model name and alias a request can name."""
        return [name for m in self.models.values() for name in (m.name, *m.aliases)]

    def model_list(self) -> ModelList:
        """Every name a request can use: each served model, then each alias (its `root` the model)."""
        served = [ModelCard(id=m.name, created=m.created, max_model_len=m.max_model_len,
                            root=m.adapter_path or m.name, parent=m.adapter_of, aliases=list(m.aliases))
                  for m in self.models.values()]
        aliases = [ModelCard(id=alias, created=m.created, max_model_len=m.max_model_len, root=m.name)
                   for m in self.models.values() for alias in m.aliases]
        splits = [ModelCard(id=name, created=0, max_model_len=length, root=name)
                  for name, length in self.split_lengths.items()]
        return ModelList(data=served + aliases + splits)

    async def tokenize(self, body: Any) -> TokenizeResponse:
        """vLLM's `/tokenize`, answered with the model's tokenizer here (its chat template for `messages`)."""
        request = self._parse(TokenizeRequest, body)
        model, tokenizer = self._tokenizer_of(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("send either `prompt` or `messages`", param="prompt")
        if request.messages is not None:
            messages = _text_messages(request.messages)
            self._check_bound(model, sum(len(m["content"]) for m in messages), "messages")
            tools, generation = tool_dicts(request.tools), request.add_generation_prompt
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
        request_type = _REQUEST_TYPES[endpoint]
        try:
            request = request_type.model_validate(body)
        except ValidationError as error:
            raise invalid_field(error.errors()) from None
        model = self.resolve(request.model)
        for name, (inert, why) in model.ignored_fields.items():
            if body.get(name) not in (None, inert):
                raise bad_request(f"{name} is not supported by the engines serving {model.name!r}: {why}", param=name)
        if isinstance(request, ChatCompletionRequest) and request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        if isinstance(request, ResponsesRequest):
            _check_stateless(request)
        if not self.forwards_bodies:
            if isinstance(request, ChatCompletionRequest):
                _check_tool_choice(request)
            elif isinstance(request, CompletionRequest):
                _reject_unsupported_completion(request)
        return Validated(endpoint, body, request, model)

    async def prepare(self, validated: Validated) -> PreparedRequest:
        """Tokens, keys and the engine request (tokenizing off the loop when the prompt is long)."""
        endpoint, model, request = validated.endpoint, validated.model, validated.request
        if isinstance(request, EmbeddingRequest):
            return await self._prepare_embeddings(validated, request)
        messages: list[dict[str, str]] | None = None
        more_prompts: list[list[int]] = []
        text: str | None = None
        unrenderable: str | None = None
        if isinstance(request, ResponsesRequest):
            request, unrenderable = _responses_as_chat(request)
            if unrenderable is not None and not self.forwards_bodies:
                raise bad_request(f"this engine answers Responses requests of messages only (this one has "
                                  f"{unrenderable.replace('_', ' ')}); serve the model with vLLM for more",
                                  param="input")
        if isinstance(request, ChatCompletionRequest):
            if self.forwards_bodies and endpoint == "chat":
                unrenderable = _unrenderable(validated.body)
            messages = _text_messages(request.messages, refuse_other_parts=unrenderable is None)
            if unrenderable is not None:
                self._key_fallback(model, unrenderable)
                prompt = []
            elif model.tokenizer is not None:
                self._check_bound(model, sum(len(m["content"]) for m in messages), "messages")
                tools = request.tool_dicts
                prompt = await _tokenize(lambda: _chat_prompt(model, messages, tools), _chars(messages))
            else:
                prompt = []
            max_tokens = request.max_completion_tokens or request.max_tokens
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
        else:
            batch = await self._completion_prompt(model, request.prompt)
            completion_prompt = batch[0]
            prompt, text = ([], completion_prompt) if isinstance(completion_prompt, str) else (completion_prompt, None)
            more_prompts = [p for p in batch[1:] if isinstance(p, list)]
            max_tokens = request.max_tokens or (
                DEFAULT_COMPLETION_MAX_TOKENS if text is not None
                else min(DEFAULT_COMPLETION_MAX_TOKENS, max(model.max_model_len - len(prompt), 1))
            )
            logprobs = request.logprobs
        if unrenderable is not None:
            # The engine renders it; it checks the length too.
            block_hashes, estimate, chat_messages = [], None, None
        elif prompt or model.tokenizer is not None:
            for other in more_prompts:
                _check_length(model, len(other), max_tokens)
            max_tokens = _check_length(model, len(prompt), max_tokens)
            block_hashes = model.hasher.block_hashes(prompt, model.block_size, lora_name=model.adapter_name,
                                                     lora_path=model.adapter_path)
            estimate, chat_messages = None, None
        else:
            # The servers tokenize: they check the length, and the router keys on the text.
            assert model.text_keys is not None
            key_text = chat_key_text(messages or []) if text is None else text
            block_hashes = model.text_keys.block_keys(key_text)
            estimate = model.text_keys.estimate_tokens(key_text)
            chat_messages = messages  # None for a completion: its text goes as `prompt`
        engine_request = EngineRequest(
            request_id=f"{_ID_PREFIXES[endpoint]}-{uuid.uuid4().hex}",
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
            lora_name=model.adapter_name,
            lora_path=model.adapter_path,
        )
        return PreparedRequest(
            endpoint, model, engine_request, include_usage=request.include_usage, body=validated.body,
            request=request, more_prompts=more_prompts,
            stream=request.stream, wants_logprobs=logprobs is not None,
            return_token_ids=endpoint == "completions" and request.return_token_ids,
        )

    async def _prepare_embeddings(self, validated: Validated, request: EmbeddingRequest) -> PreparedRequest:
        """Embeddings are routed on load alone: the gateway does not tokenize them (an estimate of their
        tokens is enough for the load), an engine's own server tokenizes every input."""
        model = validated.model
        inputs = request.inputs
        if not inputs:
            raise bad_request("the input is empty", param="input")
        prompts: list[list[int]] = []
        estimate = None
        if self.forwards_bodies or model.tokenizer is None:
            estimate = sum(max(1, len(item) // _CHARS_PER_TOKEN_ESTIMATE) if isinstance(item, str) else len(item)
                           for item in inputs)
        else:
            for index, item in enumerate(inputs):
                param = f"input.{index}" if len(inputs) > 1 else "input"
                tokens = await self._one_prompt(model, item, param)
                assert isinstance(tokens, list)
                _check_length(model, len(tokens), 1)
                prompts.append(tokens)
        engine_request = EngineRequest(
            request_id=f"{_ID_PREFIXES['embeddings']}-{uuid.uuid4().hex}", model=model.name,
            prompt_token_ids=prompts[0] if prompts else [],
            prompt_tokens_estimate=estimate, sampling=SamplingParams(max_tokens=1), priority=request.priority,
        )
        return PreparedRequest("embeddings", model, engine_request, include_usage=False, body=validated.body,
                               request=request, more_prompts=prompts[1:])

    async def _completion_prompt(
        self, model: ServedModel, prompt: str | list[int] | list[str] | list[list[int]]
    ) -> list[list[int] | str]:
        """Each prompt's token ids, or its text when the servers tokenize (no tokenizer here). A batch
        has several; the gateway, which only routes, tokenizes the first (its keys route the batch)."""
        if isinstance(prompt, str) or not prompt or all(isinstance(token, int) for token in prompt):
            batch: list[str | list[int]] = [prompt]  # type: ignore[list-item]
        else:
            batch = list(prompt)  # type: ignore[arg-type]
        if self.forwards_bodies:
            batch = batch[:1]
        return [await self._one_prompt(model, one, f"prompt.{i}" if len(batch) > 1 else "prompt")
                for i, one in enumerate(batch)]

    async def _one_prompt(self, model: ServedModel, prompt: str | list[int], param: str) -> list[int] | str:
        if isinstance(prompt, str):
            if model.tokenizer is None:
                if not prompt:
                    raise bad_request("the prompt is empty", param=param)
                return prompt
            self._check_bound(model, len(prompt), param)
            tokenizer = model.tokenizer
            return await _tokenize(lambda: tokenizer.encode(prompt), len(prompt))
        if not prompt:
            raise bad_request("the prompt is empty", param=param)
        if model.tokenizer is None:
            return list(prompt)  # the server checks its vocabulary
        vocab = model.tokenizer.vocab_size
        bad = next((token for token in prompt if not 0 <= token < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (size {vocab})", param=param)
        return list(prompt)

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


def _check_stateless(request: ResponsesRequest) -> None:
    # A response stored on one engine replica cannot be found by the next request, which may go to
    # another: the gateway serves the Responses API statelessly, and says so rather than half-working.
    if request.previous_response_id is not None:
        raise bad_request("the gateway serves the Responses API statelessly: send the whole conversation as "
                          "`input` instead of `previous_response_id`", param="previous_response_id")
    if request.background:
        raise bad_request("background responses need a stored response; the gateway serves the Responses API "
                          "statelessly", param="background")


# Responses API content parts that are text, as chat's "text" part is.
_TEXT_PARTS = ("input_text", "output_text", "text")


def _responses_as_chat(request: ResponsesRequest) -> tuple[ChatCompletionRequest, str | None]:
    """The chat a Responses request amounts to, as vLLM builds it (instructions as the system message,
    a text input as the user's), and why the gateway cannot render it exactly, if it cannot."""
    messages: list[dict[str, Any]] = []
    reason: str | None = "tools" if request.tools else None
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        for item in request.input:
            role, content = item.get("role"), item.get("content")
            if item.get("type", "message") != "message" or role not in ("system", "developer", "user", "assistant"):
                reason = reason or "tool_messages"
                continue
            if isinstance(content, list):
                if any(not isinstance(p, dict) or p.get("type") not in _TEXT_PARTS for p in content):
                    reason = reason or "content_parts"
                content = [{"type": "text", "text": p.get("text")} for p in content
                           if isinstance(p, dict) and p.get("type") in _TEXT_PARTS]
            messages.append({"role": role, "content": content})
    if not messages:
        raise bad_request("the input is empty", param="input")
    chat = {"model": request.model, "messages": messages, "max_tokens": request.max_output_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "stream": request.stream,
            "user": request.user, "priority": request.priority, "seed": request.seed}
    try:
        return ChatCompletionRequest.model_validate(chat), reason
    except ValidationError as error:
        raise invalid_field(error.errors()) from None


def _check_tool_choice(request: ChatCompletionRequest) -> None:
    """What vLLM's server checks of `tool_choice` (the gateway leaves it to the engine it forwards to)."""
    choice = request.tool_choice
    if choice is None or choice == "none":
        return
    if not request.tools:
        raise bad_request("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if not isinstance(choice, str) and choice.function.name not in {t.function.name for t in request.tools}:
        raise bad_request(f"tool_choice names the function {choice.function.name!r}, which is not among `tools`",
                          param="tool_choice")


def _reject_unsupported_completion(request: CompletionRequest) -> None:
    # As vLLM: a suffix needs a model with fill-in-the-middle rendering, and best_of is gone from its V1 engine.
    if request.suffix:
        raise bad_request("this engine takes no suffix (it needs a fill-in-the-middle model)", param="suffix")
    if request.best_of not in (None, 1):
        raise bad_request("this engine generates each choice once (best_of=1); ask for n choices instead",
                          param="best_of")


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
