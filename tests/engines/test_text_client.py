"""Serving a model whose tokenizer the gateway does not have: the prompt goes to the server as text
(chat messages to its /v1/chat/completions), the server's usage comes back. Against the project's
simulated vLLM server in-process."""

import contextlib
import json

import httpx
import pytest

from app.api.errors import APIError
from app.api.serving import OpenAIServing, ServedModel
from app.deployments.direct_stream import stream_from_server
from app.engines.external.text_client import OpenAITextClient, text_body
from app.engines.protocol import EngineRequest, SamplingParams
from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.server import create_app
from app.router.text_keys import ApproximateBlockKeys, chat_key_text
from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer

SYSTEM = "You answer questions about the cluster in one short sentence. " * 3


class RecordingServer:
    """The engine client the external ingress uses, minus the ranking: one server, requests kept."""

    def __init__(self, server: OpenAITextClient) -> None:
        self.server = server
        self.requests: list[EngineRequest] = []

    async def generate(self, request: EngineRequest):
        self.requests.append(request)
        async with contextlib.aclosing(stream_from_server(self.server, request, "server-0")) as outputs:
            async for output in outputs:
                yield output


@pytest.fixture
async def gateway():
    app = create_app(SimulatedEngineConfig(time_scale=0.01), max_model_len=512)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://server"
    ) as http:
        engine = RecordingServer(OpenAITextClient(http, "http://server", "sim-llama"))
        model = ServedModel(name="untokenized", tokenizer=None, engine=engine, max_model_len=4096, block_size=16,
                            text_keys=ApproximateBlockKeys(block_size=16, chars_per_token=4.0))
        yield OpenAIServing([model]), engine


async def test_chat_goes_to_the_server_as_messages_and_its_usage_comes_back(gateway):
    serving, engine = gateway
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is node 3 healthy?"}]
    reply = await serving.create("chat", {"model": "untokenized", "messages": messages, "max_tokens": 6,
                                          "ignore_eos": True})
    sent = engine.requests[-1]
    assert sent.chat_messages == messages and sent.prompt_token_ids == []
    # Approximate keys: one per 64 characters (16-token blocks at 4 characters a token).
    assert len(sent.block_hashes) == len(chat_key_text(messages)) // 64 == 3
    # The server's own counts: it applied its chat template and tokenized.
    expected_prompt = len(PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR).encode_chat(messages))
    assert reply.usage.prompt_tokens == expected_prompt
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content


async def test_streamed_completion_text_with_usage(gateway):
    serving, engine = gateway
    chunks = [c async for c in serving.stream("completions", {
        "model": "untokenized", "prompt": SYSTEM, "max_tokens": 5, "ignore_eos": True,
        "stream_options": {"include_usage": True},
    })]
    assert engine.requests[-1].prompt == SYSTEM and engine.requests[-1].chat_messages is None
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens > 0
    assert serving.metrics.generation_tokens.labels("untokenized")._value.get() == 5


async def test_the_server_checks_the_length_and_its_refusal_reaches_the_client(gateway):
    serving, _ = gateway
    with pytest.raises(APIError) as refused:
        await serving.create("completions", {"model": "untokenized", "prompt": "word " * 600, "max_tokens": 1})
    assert refused.value.status_code == 400 and "maximum context length" in refused.value.message


def test_only_standard_fields_go_out_unless_asked_for():
    request = EngineRequest(request_id="r", model="m", chat_messages=[{"role": "user", "content": "hi"}],
                            sampling=SamplingParams(logprobs=2))
    body = text_body(request, "served")
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["model"] == "served"
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["stream_options"] == {"include_usage": True}
    assert not {"max_tokens", "prompt", "ignore_eos", "stop_token_ids", "priority"} & body.keys()


async def test_chat_logprobs_and_usage_from_a_vllm_shaped_stream():
    def sse(*chunks: dict) -> bytes:
        return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"

    top = [{"token": "Hi", "logprob": -0.1}, {"token": "Yo", "logprob": -2.5}]
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None,
                      "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "top_logprobs": top}]}}]},
        {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2,
                                  "prompt_tokens_details": {"cached_tokens": 8}}},
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body))) as http:
        client = OpenAITextClient(http, "http://server", "served")
        request = EngineRequest(request_id="r", model="m", chat_messages=[{"role": "user", "content": "hi"}],
                                sampling=SamplingParams(logprobs=1))
        outputs = [o async for o in client.stream(request)]
    assert [o.text for o in outputs] == ["Hi", "!"]  # the empty role delta is not passed on
    assert [(t.token, t.logprob) for t in outputs[0].logprobs[0].top_logprobs] == [("Hi", -0.1), ("Yo", -2.5)]
    last = outputs[-1]
    assert (last.finish_reason, last.num_prompt_tokens, last.num_cached_tokens, last.num_output_tokens) == (
        "stop", 9, 8, 2)
