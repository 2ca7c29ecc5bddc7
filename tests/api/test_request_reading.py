"""Requests read as OpenAI reads them, on the gateway's own app and on an engine's own server alike:
null means the default, types are strict, bodies are UTF-8 JSON, and nothing a client sends is a 500."""

import contextlib
import json

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError

from app.api.asgi import GatewayASGI
from app.api.gateway_serving import GatewayServing
from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.server import create_app
from app.gateway.client_builder import ClientBuilder, ModelPlan, Reach
from app.gateway.routed import HTTPTransport
from app.kv.hashing import get_hasher
from app.openai.prepare import ServedModel
from app.router.scheduler import Scheduler
from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer
from app.upstream import UpstreamPool
from tests.gateway.servers import fleet, serving

FAST = SimulatedEngineConfig(time_scale=0.01)
MESSAGES = [{"role": "user", "content": "Hello there"}]


@contextlib.asynccontextmanager
async def gateway_app(engine_app=None, max_model_len: int = 512):
    """The gateway's ASGI app routing to a simulated engine's own server on loopback (no Ray)."""
    engine_app = engine_app or create_app(FAST, model="sim-llama", max_model_len=max_model_len)
    async with serving(engine_app) as url:
        state = fleet(("e", url, "mixed"), model="sim-llama", node_id="here")
        client = ClientBuilder(Scheduler(state)).build(ModelPlan("sim-llama", 16),
                                                       Reach(http=HTTPTransport(UpstreamPool()), node_id="here"))
        model = ServedModel("sim-llama", PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR), client,
                            max_model_len=max_model_len,
                            block_size=16, hasher=get_hasher(), aliases=("default",))
        yield GatewayASGI(GatewayServing([model]), max_body_bytes=1 << 20, metrics=lambda: b"")
    await engine_app.state.engine.shutdown()


@contextlib.asynccontextmanager
async def engine_server_app(max_model_len: int = 512):
    app = create_app(FAST, model="sim-llama", max_model_len=max_model_len)
    yield app
    await app.state.engine.shutdown()


@pytest.fixture(params=["gateway", "engine server"])
async def http(request):
    factory = gateway_app if request.param == "gateway" else engine_server_app
    async with factory() as app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                   base_url="http://test") as client:
        yield client


async def test_null_means_the_default_as_openai_reads_it(http):
    body = {"model": "sim-llama", "messages": MESSAGES, "max_tokens": 3, "temperature": None, "top_p": None,
            "n": None, "stream": None, "presence_penalty": None, "logprobs": None, "stop": None, "seed": None}
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"


async def test_the_official_client_sends_none_arguments_as_null_and_gets_an_answer(http):
    client = AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)
    reply = await client.chat.completions.create(model="sim-llama", messages=MESSAGES, max_tokens=3,
                                                 extra_body={"temperature": None, "top_p": None})
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("max_tokens", "8", "max_tokens: Input should be a valid integer"),
    ("max_tokens", True, "max_tokens: Input should be a valid integer"),
    ("stream", "true", "stream: Input should be a valid boolean"),
    ("temperature", "0.5", "temperature: Input should be a valid number"),
    ("prompt", [True], "prompt: invalid type; expected one of str, list[int], list[str], list[list[int]]"),
    ("prompt", [], "the prompt is empty"),
])
async def test_values_of_the_wrong_type_are_refused_not_coerced(http, field, value, expected):
    body = {"model": "sim-llama", "prompt": "Hi", "max_tokens": 2, field: value}
    r = await http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] == expected and error["param"] == ("prompt" if field == "prompt" else field)


@pytest.mark.parametrize(("content", "headers", "says"), [
    (json.dumps({"model": "sim-llama", "prompt": "Hi"}).encode("utf-16"), {"content-type": "application/json"},
     "not UTF-8"),
    (json.dumps({"model": "sim-llama", "prompt": "Hi"}).encode(), {"content-type": "text/plain"},
     "Content-Type: application/json"),
    (b"[" * 50_000 + b"]" * 50_000, {"content-type": "application/json"}, "nested too deeply"),
    (b'{"model": "sim-llama", "prompt": "x\\ud800y"}', {"content-type": "application/json"},
     "prompt: the text holds a lone UTF-16 surrogate"),
    (b'{"model": "sim-llama", "prompt": "Hi", "temperature": NaN}', {"content-type": "application/json"},
     "NaN is not a JSON number"),
])
async def test_bodies_that_are_not_utf8_json_are_400s_naming_the_problem(http, content, headers, says):
    r = await http.post("/v1/completions", content=content, headers=headers)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]


async def test_a_lone_surrogate_in_a_chat_message_is_a_400_naming_it(http):
    content = b'{"model": "sim-llama", "messages": [{"role": "user", "content": "a\\udc00b"}]}'
    r = await http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


async def test_paired_surrogates_are_one_character_and_fine(http):
    content = b'{"model": "sim-llama", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    r = await http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


async def test_a_model_is_retrieved_by_name_and_an_unknown_one_is_404(http):
    client = AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)
    model = await client.models.retrieve("sim-llama")
    assert model.id == "sim-llama" and model.object == "model"
    with pytest.raises(NotFoundError) as missing:
        await client.models.retrieve("nope")
    assert missing.value.body["code"] == "model_not_found"


async def test_aliases_are_listed_and_retrieved_as_models_of_their_own():
    async with gateway_app() as app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                       base_url="http://test") as http:
        r = await http.get("/v1/models/default")
        listed = (await http.get("/v1/models")).json()["data"]
    assert r.status_code == 200 and r.json()["id"] == "default" and r.json()["root"] == "sim-llama"
    assert [(m["id"], m["root"]) for m in listed] == [("sim-llama", "sim-llama"), ("default", "sim-llama")]


async def test_the_clients_own_errors_reach_it_through_the_official_client(http):
    client = AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)
    with pytest.raises(BadRequestError) as refused:
        await client.completions.create(model="sim-llama", prompt=[], max_tokens=2)
    assert refused.value.body["param"] == "prompt"
