"""Serving a model whose tokenizer the gateway does not have: the client's body goes to the server as it
came (chat messages to its /v1/chat/completions), the server tokenizes and its usage comes back. The
whole gateway core, in-process, against the project's simulated vLLM server on loopback."""

import pytest

from app.api.gateway_serving import GatewayServing
from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.server import create_app
from app.kv.text_keys import ApproximateBlockKeys, chat_key_text
from app.openai.errors import APIError
from app.openai.prepare import ServedModel
from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer
from tests.gateway.servers import Recorder, fleet, routed_client, serving

SYSTEM = "You answer questions about the cluster in one short sentence. " * 3


class KeptRequests:
    """The routed client, keeping the engine requests (the router's keys) it was given."""

    def __init__(self, client) -> None:
        self.client = client
        self.requests = []

    async def open(self, request, call):
        self.requests.append(request)
        return await self.client.open(request, call)


@pytest.fixture
async def gateway():
    app = create_app(SimulatedEngineConfig(time_scale=0.01), max_model_len=512)
    recorder = Recorder(app)
    async with app.router.lifespan_context(app), serving(recorder) as url:
        client = KeptRequests(routed_client(fleet(("server-0", url, "mixed"), model="untokenized")
                                            , model="untokenized"))
        model = ServedModel(name="untokenized", tokenizer=None, engine=client, max_model_len=4096, block_size=16,
                            text_keys=ApproximateBlockKeys(block_size=16, chars_per_token=4.0),
                            engine_model_name="sim-llama")
        yield GatewayServing([model]), client, recorder


async def test_chat_goes_to_the_server_as_messages_and_its_usage_comes_back(gateway):
    serving_, client, server = gateway
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is node 3 healthy?"}]
    reply = await serving_.create("chat", {"model": "untokenized", "messages": messages, "max_tokens": 6,
                                           "ignore_eos": True})
    sent = client.requests[-1]
    assert server.paths[-1] == "/v1/chat/completions" and server.bodies[-1]["messages"] == messages
    assert "prompt" not in server.bodies[-1] and sent.prompt_token_ids == []
    # Approximate keys: one per 64 characters (16-token blocks at 4 characters a token).
    assert len(sent.block_hashes) == len(chat_key_text(messages)) // 64 == 3
    # The server's own counts: it applied its chat template and tokenized.
    expected_prompt = len(PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR).encode_chat(messages))
    assert reply["usage"]["prompt_tokens"] == expected_prompt
    assert reply["usage"]["completion_tokens"] == 6 and reply["choices"][0]["finish_reason"] == "length"
    assert reply["choices"][0]["message"]["content"] and reply["model"] == "untokenized"


async def test_streamed_completion_text_with_usage(gateway):
    serving_, client, server = gateway
    chunks = [c async for c in serving_.stream("completions", {
        "model": "untokenized", "prompt": SYSTEM, "max_tokens": 5, "ignore_eos": True,
        "stream_options": {"include_usage": True},
    })]
    assert server.paths[-1] == "/v1/completions" and server.bodies[-1]["prompt"] == SYSTEM
    assert client.requests[-1].chat_messages is None
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert chunks[-1]["usage"]["completion_tokens"] == 5 and chunks[-1]["usage"]["prompt_tokens"] > 0
    assert serving_.metrics.generation_tokens.labels("untokenized")._value.get() == 5


async def test_the_server_checks_the_length_and_its_refusal_reaches_the_client(gateway):
    serving_, _, _ = gateway
    with pytest.raises(APIError) as refused:
        await serving_.create("completions", {"model": "untokenized", "prompt": "word " * 600, "max_tokens": 1})
    assert refused.value.status_code == 400 and "maximum context length" in refused.value.message


async def test_only_the_clients_own_fields_go_out(gateway):
    serving_, _, server = gateway
    body = {"model": "untokenized", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    [_ async for _ in serving_.stream("chat", body)]
    sent = server.bodies[-1]
    # The engine's name for the model, and the usage the gateway reads for its metrics: nothing else added.
    assert sent == {**body, "model": "sim-llama", "stream_options": {"include_usage": True}}
