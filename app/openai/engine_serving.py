"""An engine's own OpenAI server: engine outputs turned into OpenAI responses and streamed chunks.

The simulated engine's standalone server (and anything else that serves an in-process engine) answers
here, as vLLM's OpenAI server does for vLLM: requests are prepared once (app/openai/prepare.py), the
engine streams outputs, and this builds the responses. A stream's first chunk goes out with the first
output, so a refusal before generation is still an HTTP status. The gateway itself does not rebuild
streams: it relays the engines' answers (app/gateway/relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from app.openai.errors import APIError, bad_request
from app.openai.metrics import ServingMetrics
from app.openai.prepare import (
    Endpoint,
    PreparedRequest,
    ServedModel,
)
from app.openai.serving_base import ServingBase
from app.protocol.engine import EngineOutput, EngineRequest, EngineRequestRejected, TokenLogprob
from app.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    PromptTokensDetails,
    Usage,
)

logger = logging.getLogger(__name__)

__all__ = ["Endpoint", "OpenAIServing", "ServedModel", "StreamingEngine"]


class StreamingEngine(Protocol):
    """What an engine's own server serves from: an engine in-process (or anything that streams outputs)."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]: ...


@dataclass
class _Result:
    text: str = ""
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    kv_transfer_params: dict[str, Any] | None = None

    def add(self, output: EngineOutput) -> None:
        self.text += output.text
        if output.kv_transfer_params is not None:
            self.kv_transfer_params = output.kv_transfer_params
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


class OpenAIServing(ServingBase):
    """The OpenAI API over a set of served models, each with an engine that streams outputs."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        *,
        metrics: ServingMetrics | None = None,
        max_inflight_requests: int | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        super().__init__(models, metrics=metrics)
        self._max_inflight = max_inflight_requests
        self._inflight = 0
        self._retry_after_s = retry_after_s

    async def create(self, endpoint: Endpoint, body: Any) -> ChatCompletionResponse | CompletionResponse:
        """A whole (non-streaming) response."""
        prepared = await self._prepare_counted(endpoint, body)
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
                kv_transfer_params=result.kv_transfer_params,
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
            kv_transfer_params=result.kv_transfer_params,
        )

    async def stream(self, endpoint: Endpoint, body: Any) -> AsyncIterator[BaseModel]:
        """Streamed chunks exactly as OpenAI sends them (the caller adds the SSE framing).

        Nothing is yielded before the engine's first output, as vLLM does it: errors found before
        generation starts (validation, overload, an option the engine refuses) are raised before the
        first chunk, so an HTTP caller that waits for the first chunk answers with a real status.
        """
        prepared = await self._prepare_counted(endpoint, body)
        chunks = _ChunkFactory(prepared)
        result = _Result()
        opened = endpoint != "chat"
        async with self._serve(prepared) as outputs:
            async for output in outputs:
                if not opened:
                    opened = True
                    yield chunks.chat(ChatDelta(role="assistant", content=""))
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

    async def _prepare_counted(self, endpoint: Endpoint, body: Any) -> PreparedRequest:
        try:
            return await self.preparer.prepare(self.preparer.validate(endpoint, body))
        except APIError as error:
            self._count_refusal(endpoint, body, error)
            raise

    # -- running a request ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _serve(self, prepared: PreparedRequest) -> AsyncIterator[AsyncIterator[EngineOutput]]:
        """Admission, the engine call, metrics and error mapping around one request."""
        if self._max_inflight is not None and self._inflight >= self._max_inflight:
            self.metrics.requests.labels(prepared.model.name, prepared.endpoint, "429").inc()
            raise APIError(429, "The server is at its limit of requests in flight; retry after the indicated delay.",
                           code="too_many_requests", retry_after_s=self._retry_after_s)
        self._inflight += 1
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
            self._inflight -= 1
            metrics.inflight.dec()
            metrics.requests.labels(name, prepared.endpoint, status).inc()
            if status == "200":
                metrics.e2e.labels(name).observe(time.monotonic() - started)

    async def _outputs(self, prepared: PreparedRequest, started: float) -> AsyncIterator[EngineOutput]:
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

    def __init__(self, prepared: PreparedRequest) -> None:
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
