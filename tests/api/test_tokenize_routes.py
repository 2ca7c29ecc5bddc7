"""`/v1/tokenize` and `/v1/detokenize`, as vLLM serves them, answered by the gateway's own tokenizer."""

import httpx
import pytest

from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer
from tests.api.test_request_reading import gateway_app

TOKENIZER = PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture
async def http():
    async with gateway_app() as app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                       base_url="http://test") as client:
        yield client


async def test_a_prompt_tokenizes_as_the_model_does(http):
    r = await http.post("/v1/tokenize", json={"model": "sim-llama", "prompt": "Hello there"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == TOKENIZER.encode("Hello there") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 512
    bare = (await http.post("/tokenize", json={"model": "default", "prompt": "Hello there",
                                               "add_special_tokens": False})).json()
    assert bare["tokens"] == TOKENIZER.encode("Hello there", add_special_tokens=False)


async def test_a_chat_tokenizes_through_the_chat_template(http):
    r = await http.post("/v1/tokenize", json={"model": "sim-llama", "messages": MESSAGES})
    assert r.json()["tokens"] == TOKENIZER.encode_chat(MESSAGES)
    r = await http.post("/v1/tokenize", json={"model": "sim-llama", "messages": MESSAGES,
                                              "add_generation_prompt": False})
    assert r.json()["tokens"] == TOKENIZER.encode_chat(MESSAGES, add_generation_prompt=False)


async def test_detokenize_gives_the_text_back(http):
    tokens = TOKENIZER.encode("Hello there", add_special_tokens=False)
    r = await http.post("/v1/detokenize", json={"model": "sim-llama", "tokens": tokens})
    assert r.status_code == 200 and r.json()["prompt"] == "Hello there"


@pytest.mark.parametrize(("route", "body", "status", "param"), [
    ("/v1/tokenize", {"model": "sim-llama"}, 400, "prompt"),
    ("/v1/tokenize", {"model": "sim-llama", "prompt": "x", "messages": MESSAGES}, 400, "prompt"),
    ("/v1/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/detokenize", {"model": "sim-llama", "tokens": [10**9]}, 400, "tokens"),
    ("/v1/detokenize", {"model": "sim-llama", "tokens": ["a"]}, 400, "tokens.0"),
])
async def test_mistakes_are_openai_errors_naming_the_field(http, route, body, status, param):
    r = await http.post(route, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
