"""Turns OpenAI requests into engine requests and engine outputs into OpenAI responses.

Validation, model resolution, admission and tokenization happen once, here, before any engine is
called; every failure is an APIError with the status a client can act on. Knows nothing of HTTP
or Ray: the Serve ingress, the handle API and the standalone simulator server all call into this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from app.api.errors import APIError, bad_request, invalid_field
from app.api.metrics import GatewayMetrics
from app.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
)
from app.engines.protocol import EngineOutput, EngineRequest, EngineRequestRejected, SamplingParams, TokenLogprob
from app.router.admission import InflightLimit
from app.router.hashing import BlockHasher, get_hasher
from app.router.models import ModelEntry, ModelRegistry, UnknownModelError
from app.router.text_keys import ApproximateBlockKeys, chat_key_text
from app.tokenizer import PromptTokenizer, TemplateError

logger = logging.getLogger(__name__)

Endpoint = Literal["chat", "completions"]
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


class EngineClient(Protocol):
    """Where a model's requests go: an engine in-process, or a Serve handle to engine replicas."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]: ...


@dataclass
class ServedModel:
    name: str
    tokenizer: PromptTokenizer | None
    """None: the servers tokenize (external servers without a configured tokenizer); prompts go to
    them as text and the router keys them by `text_keys` instead of the servers' block hashes."""
    engine: EngineClient
    max_model_len: int
    block_size: int
    hasher: BlockHasher = field(default_factory=get_hasher)
    """The engines' block-hash function, so the router's keys equal the engines' own."""
    aliases: tuple[str, ...] = ()
    include_prompt_text: bool = False
    """Send the prompt text along (only Ray's PrefixCacheAffinityRouter baseline reads it)."""
    created: int = field(default_factory=lambda: int(time.time()))
    text_keys: ApproximateBlockKeys | None = None

    def __post_init__(self) -> None:
        if self.tokenizer is None and self.text_keys is None:
            raise ValueError(f"model {self.name!r} has no tokenizer: give the text_keys its router keys on")

    @property
    def approximate_keys(self) -> bool:
        return self.tokenizer is None


@dataclass
class _Prepared:
    endpoint: Endpoint
    model: ServedModel
    engine_request: EngineRequest
    include_usage: bool
    wants_logprobs: bool = False
    return_token_ids: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def request_id(self) -> str:
        return self.engine_request.request_id


@dataclass
class _Result:
    text: str = ""
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def add(self, output: EngineOutput) -> None:
        self.text += output.text
        self.token_ids.extend(output.token_ids)
        self.num_output_tokens = _output_count(output, self.num_output_tokens)
        self.logprobs.extend(output.logprobs or [])
        self.num_prompt_tokens = output.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = output.num_cached_tokens or self.num_cached_tokens
        self.finish_reason = output.finish_reason

    def usage(self, request: EngineRequest) -> Usage:
        # The gateway's own count when it tokenized; the server's when it tokenized itself.
        num_prompt_tokens = len(request.prompt_token_ids) or self.num_prompt_tokens
        return Usage(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=self.num_output_tokens,
            total_tokens=num_prompt_tokens + self.num_output_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.num_cached_tokens),
        )


class OpenAIServing:
    """The OpenAI API over a set of served models."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        *,
        metrics: GatewayMetrics | None = None,
        max_inflight_requests: int | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        self._models = {model.name: model for model in models}
        self._registry = ModelRegistry(ModelEntry(m.name, m.aliases) for m in models)
        self.metrics = metrics or GatewayMetrics()
        self._admission = InflightLimit(max_inflight_requests)
        self._retry_after_s = retry_after_s

    # -- public API ----------------------------------------------------------------------------

    def list_models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(id=m.name, created=m.created, max_model_len=m.max_model_len, aliases=list(m.aliases))
                for m in self._models.values()
            ]
        )

    async def create(self, endpoint: Endpoint, body: Any) -> ChatCompletionResponse | CompletionResponse:
        """A whole (non-streaming) response."""
        prepared = self._prepare_counted(endpoint, body)
        result = _Result()
        async with self._serve(prepared) as outputs:
            async for output in outputs:
                result.add(output)
        usage = result.usage(prepared.engine_request)
        if endpoint == "chat":
            return ChatCompletionResponse(
                id=prepared.request_id,
                created=prepared.created,
                model=prepared.model.name,
                choices=[ChatChoice(message=AssistantMessage(content=result.text),
                                    logprobs=_chat_logprobs(result.logprobs) if prepared.wants_logprobs else None,
                                    finish_reason=result.finish_reason)],
                usage=usage,
            )
        return CompletionResponse(
            id=prepared.request_id,
            created=prepared.created,
            model=prepared.model.name,
            choices=[CompletionChoice(
                text=result.text,
                logprobs=_completion_logprobs(result.logprobs, 0) if prepared.wants_logprobs else None,
                finish_reason=result.finish_reason,
                token_ids=result.token_ids if prepared.return_token_ids else None,
            )],
            usage=usage,
        )

    async def stream(self, endpoint: Endpoint, body: Any) -> AsyncIterator[BaseModel]:
        """Streamed chunks exactly as OpenAI sends them (the caller adds the SSE framing).

        Validation errors are raised before the first chunk, so an HTTP caller that waits for the
        first chunk can still answer with a proper error status.
        """
        prepared = self._prepare_counted(endpoint, body)
        chunks = _ChunkFactory(prepared)
        result = _Result()
        async with self._serve(prepared) as outputs:
            if endpoint == "chat":
                yield chunks.chat(ChatDelta(role="assistant", content=""))
            async for output in outputs:
                text_offset = len(result.text)
                result.add(output)
                ids_wanted = prepared.return_token_ids and output.token_ids
                if output.text or output.finished or output.logprobs or ids_wanted:
                    yield chunks.piece(output.text, None, output.logprobs, text_offset, output.token_ids)
                if output.finished:
                    yield chunks.piece(None, output.finish_reason)
        if prepared.include_usage:
            yield chunks.usage(result.usage(prepared.engine_request))

    # -- preparing a request -------------------------------------------------------------------

    def _prepare_counted(self, endpoint: Endpoint, body: Any) -> _Prepared:
        try:
            return self._prepare(endpoint, body)
        except APIError as error:
            requested = body.get("model") if isinstance(body, dict) else None
            label = requested if isinstance(requested, str) and requested in self._models else "unknown"
            self.metrics.requests.labels(label, endpoint, str(error.status_code)).inc()
            raise

    def _prepare(self, endpoint: Endpoint, body: Any) -> _Prepared:
        request_type = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
        try:
            request = request_type.model_validate(body)
        except ValidationError as error:
            raise invalid_field(error.errors()) from None
        model = self._resolve(request.model)
        messages: list[dict[str, str]] | None = None
        text: str | None = None
        if endpoint == "chat":
            assert isinstance(request, ChatCompletionRequest)
            _reject_unsupported_chat(request)
            messages = _text_messages(request.messages)
            prompt = self._chat_prompt(model, messages) if model.tokenizer is not None else []
            max_tokens = request.max_completion_tokens or request.max_tokens
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
        else:
            assert isinstance(request, CompletionRequest)
            _reject_unsupported_completion(request)
            completion_prompt = self._completion_prompt(model, request.prompt)
            prompt, text = ([], completion_prompt) if isinstance(completion_prompt, str) else (completion_prompt, None)
            max_tokens = request.max_tokens or (
                DEFAULT_COMPLETION_MAX_TOKENS if text is not None
                else min(DEFAULT_COMPLETION_MAX_TOKENS, max(model.max_model_len - len(prompt), 1))
            )
            logprobs = request.logprobs
        if request.n != 1:
            raise bad_request("only n=1 is supported; send one request per choice", param="n")
        if prompt or model.tokenizer is not None:
            max_tokens = self._check_length(model, len(prompt), max_tokens)
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
        )
        return _Prepared(endpoint, model, engine_request, include_usage=request.include_usage,
                         wants_logprobs=logprobs is not None,
                         return_token_ids=endpoint == "completions" and request.return_token_ids)

    def _resolve(self, requested: str) -> ServedModel:
        try:
            return self._models[self._registry.resolve(requested)]
        except UnknownModelError as error:
            raise APIError(
                404,
                f"The model {error.requested!r} does not exist. Served models: {', '.join(error.available)}.",
                param="model",
                code="model_not_found",
            ) from None

    @staticmethod
    def _chat_prompt(model: ServedModel, messages: list[dict[str, str]]) -> list[int]:
        assert model.tokenizer is not None
        try:
            return model.tokenizer.encode_chat(messages)
        except TemplateError as error:
            raise bad_request(f"the chat template rejected the messages: {error}", param="messages") from None

    @staticmethod
    def _completion_prompt(
        model: ServedModel, prompt: str | list[int] | list[str] | list[list[int]]
    ) -> list[int] | str:
        """Token ids, or the text itself when the servers tokenize (no tokenizer here)."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if model.tokenizer is None:
                if not prompt:
                    raise bad_request("the prompt is empty", param="prompt")
                return prompt
            return model.tokenizer.encode(prompt)
        if not prompt or not all(isinstance(token, int) for token in prompt):
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

    @staticmethod
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

    # -- running a request ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _serve(self, prepared: _Prepared) -> AsyncIterator[AsyncIterator[EngineOutput]]:
        """Admission, the engine call, metrics and error mapping around one request."""
        if not self._admission.try_acquire():
            self.metrics.requests.labels(prepared.model.name, prepared.endpoint, "429").inc()
            raise APIError(
                429,
                "The gateway is at its limit of requests in flight; retry after the indicated delay.",
                code="too_many_requests",
                retry_after_s=self._retry_after_s,
            )
        metrics, name = self.metrics, prepared.model.name
        metrics.inflight.inc()
        started = time.monotonic()
        status = "200"
        try:
            async with contextlib.aclosing(self._outputs(prepared, started)) as outputs:
                yield outputs
        except APIError as error:
            status = str(error.status_code)
            raise
        except BaseException as error:  # the client went away (cancel/close) or a bug
            status = "499" if isinstance(error, GeneratorExit | asyncio.CancelledError) else "500"
            if status == "500":
                logger.exception("request %s failed", prepared.request_id)
                raise APIError(500, "The gateway failed to serve this request; see its logs.") from None
            raise
        finally:
            self._admission.release()
            metrics.inflight.dec()
            metrics.requests.labels(name, prepared.endpoint, status).inc()
            if status == "200":
                metrics.e2e.labels(name).observe(time.monotonic() - started)

    async def _outputs(self, prepared: _Prepared, started: float) -> AsyncIterator[EngineOutput]:
        metrics, name = self.metrics, prepared.model.name
        generation_tokens = metrics.generation_tokens.labels(name)
        first = True
        generated = 0
        try:
            async with contextlib.aclosing(prepared.model.engine.generate(prepared.engine_request)) as outputs:
                async for output in outputs:
                    if output.finish_reason == "abort":
                        raise APIError(503, "The engine stopped this request before it finished; retry it.",
                                       retry_after_s=self._retry_after_s)
                    if first and (output.token_ids or output.text):
                        first = False
                        metrics.ttft.labels(name).observe(time.monotonic() - started)
                    if output.finished:
                        # Real vLLM reports cached prompt tokens only with the final usage.
                        metrics.prompt_tokens.labels(name).inc(output.num_prompt_tokens)
                        metrics.cached_prompt_tokens.labels(name).inc(output.num_cached_tokens)
                    counted = _output_count(output, generated)
                    generation_tokens.inc(counted - generated)
                    generated = counted
                    yield output
        except EngineRequestRejected as error:
            # Through Ray the exception arrives wrapped; its `cause` is the engine's own.
            cause = getattr(error, "cause", None) or error
            default_param = "messages" if prepared.endpoint == "chat" else "prompt"
            raise bad_request(str(cause), param=getattr(cause, "param", None) or default_param) from None


class _ChunkFactory:
    """Builds the streamed chunk objects of one request."""

    def __init__(self, prepared: _Prepared) -> None:
        self._p = prepared
        self._usage_field: dict[str, Any] = {"usage": None} if prepared.include_usage else {}

    def chat(
        self, delta: ChatDelta, finish_reason: str | None = None, logprobs: ChatLogprobs | None = None
    ) -> ChatCompletionChunk:
        p = self._p
        return ChatCompletionChunk(
            id=p.request_id, created=p.created, model=p.model.name,
            choices=[ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)],
            **self._usage_field,
        )

    def piece(
        self, text: str | None, finish_reason: str | None,
        logprobs: list[TokenLogprob] | None = None, text_offset: int = 0, token_ids: list[int] | None = None,
    ) -> BaseModel:
        p = self._p
        wanted = p.wants_logprobs and logprobs is not None
        if p.endpoint == "chat":
            delta = ChatDelta(content=text) if text is not None else ChatDelta()
            return self.chat(delta, finish_reason, _chat_logprobs(logprobs or []) if wanted else None)
        choice = CompletionChoice(
            text=text or "", finish_reason=finish_reason,
            logprobs=_completion_logprobs(logprobs or [], text_offset) if wanted else None,
            token_ids=(token_ids or []) if p.return_token_ids else None,
        )
        return CompletionChunk(
            id=p.request_id, created=p.created, model=p.model.name, choices=[choice], **self._usage_field,
        )

    def usage(self, usage: Usage) -> BaseModel:
        p = self._p
        chunk_type = ChatCompletionChunk if p.endpoint == "chat" else CompletionChunk
        return chunk_type(id=p.request_id, created=p.created, model=p.model.name, choices=[], usage=usage)


def _output_count(output: EngineOutput, so_far: int) -> int:
    """Tokens generated up to this output: counted from token ids, or the server's own total."""
    if output.num_output_tokens is not None:
        return max(so_far, output.num_output_tokens)
    return so_far + len(output.token_ids)


def _text_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The conversation as role/content strings (text parts joined); other parts are refused."""
    rendered: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages[{index}]: content parts of type {part.type!r} are not supported; "
                        "this model takes text only",
                        param=f"messages.{index}.content",
                    )
            content = "\n".join(part.text or "" for part in content)
        rendered.append({"role": message.role, "content": content or ""})
    return rendered


def _chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    def utf8(token: str) -> list[int]:
        return list(token.encode("utf-8", errors="replace"))

    return ChatLogprobs(content=[
        ChatTokenLogprob(
            token=entry.token, logprob=entry.logprob, bytes=utf8(entry.token),
            top_logprobs=[ChatTopLogprob(token=t.token, logprob=t.logprob, bytes=utf8(t.token))
                          for t in entry.top_logprobs],
        )
        for entry in entries
    ])


def _completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for entry in entries:
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append({t.token: t.logprob for t in entry.top_logprobs})
        out.text_offset.append(text_offset)
        text_offset += len(entry.token)
    return out


def _reject_unsupported_chat(request: ChatCompletionRequest) -> None:
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    if request.tools:
        raise bad_request("tool calling is not supported by this gateway yet", param="tools")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise bad_request("only response_format type 'text' is supported", param="response_format")


def _reject_unsupported_completion(request: CompletionRequest) -> None:
    if request.echo:
        raise bad_request("echo is not supported by this gateway yet", param="echo")
    if request.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if request.best_of not in (None, 1):
        raise bad_request("only best_of=1 is supported", param="best_of")


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
