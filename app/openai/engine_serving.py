"""An engine's own OpenAI server: engine outputs turned into OpenAI responses and streamed chunks.

The simulated engine's standalone server (and anything else that serves an in-process engine) answers
here, as vLLM's OpenAI server does for vLLM: requests are prepared once (app/openai/prepare.py), the
engine streams outputs, and this builds the responses. A stream's first chunk goes out with the first
output, so a refusal before generation is still an HTTP status. The gateway itself does not rebuild
streams: it relays the engines' answers (app/gateway/relay.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import random
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from app.openai.errors import APIError, bad_request
from app.openai.metrics import ServingMetrics
from app.openai.output_forms import OutputForm, output_form
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
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    FunctionCall,
    FunctionCallDelta,
    PromptTokensDetails,
    ResponseObject,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseUsage,
    ToolCall,
    ToolCallDelta,
    Usage,
)

logger = logging.getLogger(__name__)

__all__ = ["Endpoint", "OpenAIServing", "ServedModel", "StreamingEngine"]


class StreamingEngine(Protocol):
    """What an engine's own server serves from: an engine in-process (or anything that streams outputs)."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]: ...


@dataclass
class _Choice:
    """One choice of a response: the engine request that makes it, and what it has made so far.

    A request makes `n` choices per prompt (a batched completion has several prompts), each an engine
    request of its own: an engine without parallel sampling runs them side by side, and its prefix cache
    serves the shared prompt to all but the first.
    """

    index: int
    request: EngineRequest
    form: OutputForm | None = None
    echo: str = ""
    """The prompt's text, shown before the answer (completions with `echo`)."""
    echo_tokens: list[str] | None = None
    """The prompt's tokens, listed in the logprobs before the answer's (`echo` with `logprobs`)."""
    text: str = ""
    generated: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    started: bool = False

    def add(self, output: EngineOutput) -> str:
        """Take the engine's next output; returns the new text it adds to this choice's answer."""
        if output.kv_transfer_params is not None:
            self.kv_transfer_params = output.kv_transfer_params
        self.token_ids.extend(output.token_ids)
        self.generated = _output_count(output, self.generated)
        self.logprobs.extend(output.logprobs or [])
        self.num_prompt_tokens = output.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = output.num_cached_tokens or self.num_cached_tokens
        if self.form is None:
            piece = output.text
            self.finish_reason = output.finish_reason
        else:
            piece = self.form.upto(self.generated)[len(self.text):]
            self.finish_reason = self.form.finish(self.generated, output.finish_reason)
        self.text += piece
        return piece

    def prompt_tokens(self) -> int:
        # The gateway's own count when it tokenized; the server's when it tokenized itself.
        return len(self.request.prompt_token_ids) or self.num_prompt_tokens


def _usage(choices: Sequence[_Choice], n: int) -> Usage:
    """One count of each prompt (its n choices share it), and every choice's tokens."""
    prompt = sum(choice.prompt_tokens() for choice in choices[::n])
    completion = sum(choice.generated for choice in choices)
    cached = sum(choice.num_cached_tokens for choice in choices[::n])
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


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
        choices = _choices(prepared)
        async with self._serve(prepared, choices) as outputs:
            async for choice, output in outputs:
                choice.add(output)
        usage = _usage(choices, _n(prepared))
        transfer = choices[0].kv_transfer_params
        if endpoint == "chat":
            return ChatCompletionResponse(
                id=prepared.request_id, created=prepared.created, model=prepared.model.name,
                choices=[ChatChoice(index=c.index, message=_message(c),
                                    logprobs=_chat_logprobs(c.logprobs) if prepared.wants_logprobs else None,
                                    finish_reason=c.finish_reason) for c in choices],
                usage=usage, kv_transfer_params=transfer,
            )
        return CompletionResponse(
            id=prepared.request_id, created=prepared.created, model=prepared.model.name,
            choices=[CompletionChoice(
                index=c.index, text=c.echo + c.text,
                logprobs=_completion_logprobs(c.logprobs, c.echo_tokens) if prepared.wants_logprobs else None,
                finish_reason=c.finish_reason, token_ids=c.token_ids if prepared.return_token_ids else None,
            ) for c in choices],
            usage=usage, kv_transfer_params=transfer,
        )

    async def stream(self, endpoint: Endpoint, body: Any) -> AsyncIterator[BaseModel]:
        """Streamed chunks exactly as OpenAI sends them (the caller adds the SSE framing); the choices of
        n > 1 interleave, each chunk naming its choice's index.

        Nothing is yielded before the engine's first output, as vLLM does it: errors found before
        generation starts (validation, overload, an option the engine refuses) are raised before the
        first chunk, so an HTTP caller that waits for the first chunk answers with a real status.
        """
        prepared = await self._prepare_counted(endpoint, body)
        chunks = _ChunkFactory(prepared)
        choices = _choices(prepared)
        async with self._serve(prepared, choices) as outputs:
            async for choice, output in outputs:
                opening = not choice.started
                choice.started = True
                if opening and endpoint == "chat":
                    yield chunks.chat(choice.index, ChatDelta(role="assistant", content=""))
                text_offset = len(choice.echo) + len(choice.text)
                piece = choice.add(output)
                if opening and choice.echo:
                    yield chunks.echo(choice)
                ids_wanted = prepared.return_token_ids and output.token_ids
                if piece or output.logprobs or ids_wanted:
                    yield chunks.piece(choice, piece, output.logprobs, text_offset, output.token_ids)
                if output.finished:
                    yield chunks.piece(choice, "", None, finish_reason=choice.finish_reason)
        if prepared.include_usage:
            yield chunks.usage(_usage(choices, _n(prepared)))

    async def embed(self, body: Any) -> EmbeddingResponse:
        """Embeddings: each input is prefilled by the engine (that is their cost), and its vector is made
        up from its tokens (the same input, the same vector)."""
        prepared = await self._prepare_counted("embeddings", body)
        request = prepared.request
        assert isinstance(request, EmbeddingRequest)
        base = prepared.engine_request
        prompts = [base.prompt_token_ids, *prepared.more_prompts]
        choices = [_Choice(i, base.model_copy(update={"request_id": f"{base.request_id}-{i}", "prompt_token_ids": p,
                                                      "block_hashes": base.block_hashes if i == 0 else []}))
                   for i, p in enumerate(prompts)]
        async with self._serve(prepared, choices) as outputs:
            async for choice, output in outputs:
                choice.add(output)
        dimensions = request.dimensions or EMBEDDING_DIMENSIONS
        data = [Embedding(index=i, embedding=_encoded(_vector(p, dimensions), request.encoding_format))
                for i, p in enumerate(prompts)]
        tokens = sum(len(p) for p in prompts)
        return EmbeddingResponse(model=prepared.model.name, data=data,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    async def respond(self, body: Any) -> ResponseObject:
        """A Responses API answer, whole."""
        prepared = await self._prepare_counted("responses", body)
        (choice,) = _choices(prepared)
        async with self._serve(prepared, [choice]) as outputs:
            async for _, output in outputs:
                choice.add(output)
        return _response_object(prepared, choice, done=True)

    async def respond_stream(self, body: Any) -> AsyncIterator[dict[str, Any]]:
        """A Responses API answer as its typed events, in OpenAI's order (the caller frames them)."""
        prepared = await self._prepare_counted("responses", body)
        (choice,) = _choices(prepared)
        message_id = f"msg_{prepared.request_id.removeprefix('resp-')}"
        events = _ResponseEvents()
        async with self._serve(prepared, [choice]) as outputs:
            async for _, output in outputs:
                if not choice.started:
                    choice.started = True
                    opened = _response_object(prepared, choice, done=False).model_dump()
                    yield events.next("response.created", response=opened)
                    yield events.next("response.in_progress", response=opened)
                    item = {"type": "message", "id": message_id, "status": "in_progress", "role": "assistant",
                            "content": []}
                    yield events.next("response.output_item.added", output_index=0, item=item)
                    yield events.next("response.content_part.added", output_index=0, item_id=message_id,
                                      content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                piece = choice.add(output)
                if piece:
                    yield events.next("response.output_text.delta", output_index=0, item_id=message_id,
                                      content_index=0, delta=piece, logprobs=[])
        done = _response_object(prepared, choice, done=True, message_id=message_id).model_dump()
        part = {"type": "output_text", "text": choice.text, "annotations": []}
        yield events.next("response.output_text.done", output_index=0, item_id=message_id, content_index=0,
                          text=choice.text, logprobs=[])
        yield events.next("response.content_part.done", output_index=0, item_id=message_id, content_index=0,
                          part=part)
        yield events.next("response.output_item.done", output_index=0, item=done["output"][0])
        yield events.next(f"response.{done['status']}", response=done)

    # -- preparing a request -------------------------------------------------------------------

    async def _prepare_counted(self, endpoint: Endpoint, body: Any) -> PreparedRequest:
        try:
            return await self.preparer.prepare(self.preparer.validate(endpoint, body))
        except APIError as error:
            self._count_refusal(endpoint, body, error)
            raise

    # -- running a request ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _serve(
        self, prepared: PreparedRequest, choices: list[_Choice]
    ) -> AsyncIterator[AsyncIterator[tuple[_Choice, EngineOutput]]]:
        """Admission, the engine calls, metrics and error mapping around one request."""
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
            async with contextlib.aclosing(self._outputs(prepared, choices, started)) as outputs:
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

    async def _outputs(
        self, prepared: PreparedRequest, choices: list[_Choice], started: float
    ) -> AsyncIterator[tuple[_Choice, EngineOutput]]:
        metrics, name = self.metrics, prepared.model.name
        generation_tokens = metrics.generation_tokens.labels(name)
        first = True
        generated = {choice.index: 0 for choice in choices}
        try:
            async with contextlib.aclosing(_merged(prepared.model.engine, choices)) as outputs:
                async for choice, output in outputs:
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
                    counted = _output_count(output, generated[choice.index])
                    generation_tokens.inc(counted - generated[choice.index])
                    generated[choice.index] = counted
                    yield choice, output
        except EngineRequestRejected as error:
            # Through Ray the exception arrives wrapped; its `cause` is the engine's own.
            cause = getattr(error, "cause", None) or error
            default_param = "messages" if prepared.endpoint == "chat" else "prompt"
            raise bad_request(str(cause), param=getattr(cause, "param", None) or default_param) from None


async def _merged(engine: StreamingEngine, choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, EngineOutput]]:
    """The outputs of every choice's engine request, in the order they come."""
    if len(choices) == 1:
        async with contextlib.aclosing(engine.generate(choices[0].request)) as outputs:
            async for output in outputs:
                yield choices[0], output
        return
    queue: asyncio.Queue[tuple[_Choice, EngineOutput | BaseException | None]] = asyncio.Queue()

    async def pump(choice: _Choice) -> None:
        try:
            async with contextlib.aclosing(engine.generate(choice.request)) as outputs:
                async for output in outputs:
                    queue.put_nowait((choice, output))
        except Exception as error:  # handed to the reader, which raises it
            queue.put_nowait((choice, error))
        else:
            queue.put_nowait((choice, None))

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        remaining = len(tasks)
        while remaining:
            choice, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield choice, item
    finally:
        # Ends the other choices' engine requests too when one fails or the client goes away.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _n(prepared: PreparedRequest) -> int:
    request = prepared.request
    return request.n if isinstance(request, ChatCompletionRequest | CompletionRequest) else 1


EMBEDDING_DIMENSIONS = 64
"""The simulated engine's vectors' length, unless a request asks for `dimensions`."""


def _vector(tokens: list[int], dimensions: int) -> list[float]:
    rng = random.Random(hash(tuple(tokens)))
    values = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI sends them
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


class _ResponseEvents:
    def __init__(self) -> None:
        self._sequence = 0

    def next(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event


def _response_object(
    prepared: PreparedRequest, choice: _Choice, *, done: bool, message_id: str | None = None
) -> ResponseObject:
    body = prepared.body
    complete = choice.finish_reason != "length"
    status = ("completed" if complete else "incomplete") if done else "in_progress"
    output = []
    if done:
        message_id = message_id or f"msg_{prepared.request_id.removeprefix('resp-')}"
        output = [ResponseOutputMessage(id=message_id, status="completed" if complete else "incomplete",
                                        content=[ResponseOutputText(text=choice.text)])]
    prompt, completion = choice.prompt_tokens(), choice.generated
    return ResponseObject(
        id=prepared.request_id.replace("resp-", "resp_", 1), created_at=prepared.created, model=prepared.model.name,
        status=status, incomplete_details=None if complete or not done else {"reason": "max_output_tokens"},
        instructions=body.get("instructions"), max_output_tokens=body.get("max_output_tokens"), output=output,
        temperature=body.get("temperature"), top_p=body.get("top_p"),
        usage=ResponseUsage(input_tokens=prompt, input_tokens_details={"cached_tokens": choice.num_cached_tokens},
                            output_tokens=completion, total_tokens=prompt + completion) if done else None,
    )


def _choices(prepared: PreparedRequest) -> list[_Choice]:
    """The engine requests that make the response: n per prompt, each shaped as the request asks."""
    request, base, model = prepared.request, prepared.engine_request, prepared.model
    n = _n(prepared)
    prompts = [base.prompt_token_ids, *prepared.more_prompts]
    many = len(prompts) * n > 1
    echo = isinstance(request, CompletionRequest) and request.echo
    tokenizer = model.tokenizer

    def count_tokens(text: str) -> int:
        assert tokenizer is not None
        return len(tokenizer.encode(text, add_special_tokens=False))

    choices = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            request_id = f"{base.request_id}-{index}" if many else base.request_id
            sampling = base.sampling
            if i and sampling.seed is not None:
                sampling = sampling.model_copy(update={"seed": sampling.seed + i})  # n different choices
            form = None
            if isinstance(request, ChatCompletionRequest) and tokenizer is not None:
                rng = random.Random(f"{sampling.seed}-{i}" if sampling.seed is not None else request_id)
                form = output_form(request, count_tokens, rng)
            if form is not None:
                limit = min(sampling.max_tokens or form.num_tokens, form.num_tokens)
                sampling = sampling.model_copy(update={"max_tokens": limit, "stop": [], "ignore_eos": True})
            update: dict[str, Any] = {"request_id": request_id, "sampling": sampling}
            if p:
                update |= {"prompt_token_ids": prompt, "block_hashes": []}
            choice = _Choice(index, base.model_copy(update=update) if update else base, form)
            if echo:
                choice.echo, choice.echo_tokens = _echo(prepared, p, prompt)
            choices.append(choice)
    return choices


def _echo(prepared: PreparedRequest, p: int, prompt: list[int]) -> tuple[str, list[str] | None]:
    """The prompt's text as the client sent it, and its tokens when logprobs are wanted."""
    request, tokenizer = prepared.request, prepared.model.tokenizer
    assert isinstance(request, CompletionRequest)
    sent = request.prompt if isinstance(request.prompt, str) else request.prompt[p] if request.prompt else ""
    if isinstance(sent, str):
        text = sent
    elif tokenizer is not None:
        text = tokenizer.decode(prompt, skip_special_tokens=False)
    else:
        text = ""
    tokens = None
    if prepared.wants_logprobs and tokenizer is not None:
        tokens = [tokenizer.decode([token], skip_special_tokens=False) for token in prompt]
    return text, tokens


def _message(choice: _Choice) -> AssistantMessage:
    form = choice.form
    if form is None or form.tool_name is None:
        return AssistantMessage(content=choice.text)
    call = ToolCall(id=form.tool_call_id, function=FunctionCall(name=form.tool_name, arguments=choice.text))
    return AssistantMessage(content=None, tool_calls=[call])


class _ChunkFactory:
    """Builds the streamed chunk objects of one request."""

    def __init__(self, prepared: PreparedRequest) -> None:
        self._p = prepared
        self._usage_field: dict[str, Any] = {"usage": None} if prepared.include_usage else {}

    def chat(
        self, index: int, delta: ChatDelta, finish_reason: str | None = None, logprobs: ChatLogprobs | None = None
    ) -> ChatCompletionChunk:
        p = self._p
        return ChatCompletionChunk(
            id=p.request_id, created=p.created, model=p.model.name,
            choices=[ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)],
            **self._usage_field,
        )

    def piece(
        self, choice: _Choice, text: str, logprobs: list[TokenLogprob] | None = None, text_offset: int = 0,
        token_ids: list[int] | None = None, *, finish_reason: str | None = None,
    ) -> BaseModel:
        p = self._p
        wanted = p.wants_logprobs and logprobs is not None
        if p.endpoint == "chat":
            return self.chat(choice.index, _delta(choice, text), finish_reason,
                             _chat_logprobs(logprobs or []) if wanted else None)
        return self._completion(CompletionChoice(
            index=choice.index, text=text, finish_reason=finish_reason,
            logprobs=_completion_logprobs(logprobs or [], None, text_offset) if wanted else None,
            token_ids=(token_ids or []) if p.return_token_ids else None,
        ))

    def echo(self, choice: _Choice) -> BaseModel:
        """The echoed prompt, ahead of the answer (a completion's)."""
        logprobs = _completion_logprobs([], choice.echo_tokens) if self._p.wants_logprobs else None
        return self._completion(CompletionChoice(index=choice.index, text=choice.echo, logprobs=logprobs,
                                                 finish_reason=None))

    def _completion(self, choice: CompletionChoice) -> BaseModel:
        p = self._p
        return CompletionChunk(id=p.request_id, created=p.created, model=p.model.name, choices=[choice],
                               **self._usage_field)

    def usage(self, usage: Usage) -> BaseModel:
        p = self._p
        chunk_type = ChatCompletionChunk if p.endpoint == "chat" else CompletionChunk
        return chunk_type(id=p.request_id, created=p.created, model=p.model.name, choices=[], usage=usage)


def _delta(choice: _Choice, text: str) -> ChatDelta:
    form = choice.form
    if form is None or form.tool_name is None:
        return ChatDelta(content=text) if text else ChatDelta()
    if not text:
        return ChatDelta()
    if len(choice.text) == len(text):  # the call's first piece names it
        return ChatDelta(tool_calls=[ToolCallDelta(id=form.tool_call_id, type="function",
                                                   function=FunctionCallDelta(name=form.tool_name, arguments=text))])
    return ChatDelta(tool_calls=[ToolCallDelta(function=FunctionCallDelta(arguments=text))])


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


def _completion_logprobs(
    entries: Sequence[TokenLogprob], echoed: Sequence[str] | None, text_offset: int = 0
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token in echoed or ():
        # An echoed prompt's tokens were not sampled: no log-probability, as vLLM's first one.
        out.tokens.append(token)
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    for entry in entries:
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append({t.token: t.logprob for t in entry.top_logprobs})
        out.text_offset.append(text_offset)
        text_offset += len(entry.token)
    return out
