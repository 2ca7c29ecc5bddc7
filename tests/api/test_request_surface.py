"""The OpenAI request surface the official client uses (tools, structured outputs, n, logprobs, echo,
batched prompts), answered by the simulated engine: on its own server, and through the gateway, which
forwards the body and relays the answer. Shapes are OpenAI's; forced outputs validate against their schema."""

import json

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError

from tests.api.test_request_reading import engine_server_app, gateway_app

MODEL = "sim-llama"
MESSAGES = [{"role": "user", "content": "What is the weather in Lima?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "hourly": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "where": {"$ref": "#/$defs/point"},
    },
    "required": ["city", "unit", "days", "where"],
    "additionalProperties": False,
    "$defs": {"point": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}},
                        "required": ["lat"]}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "get_weather", "description": "Weather by city", "parameters": WEATHER}},
]


@pytest.fixture(params=["gateway", "engine server"])
async def client(request):
    factory = gateway_app if request.param == "gateway" else engine_server_app
    async with factory(max_model_len=4096) as app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                   base_url="http://test") as http:
        yield AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)


async def test_a_named_tool_is_called_with_arguments_valid_for_its_parameters(client):
    reply = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert choice.finish_reason == "stop"  # OpenAI's reason for a named function
    assert choice.message.content is None


async def test_required_tool_choice_streams_the_call_in_pieces(client):
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS[1:], tool_choice="required", max_tokens=200, stream=True)
    chunks = [chunk async for chunk in stream]
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert len(deltas) > 1, "the arguments come in pieces"
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert all(d.function.name is None and d.id is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_json_schema_output_validates_streamed_or_not(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200,
                                                 response_format=response_format)
    jsonschema.validate(json.loads(reply.choices[0].message.content), WEATHER)
    assert reply.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, stream=True,
                                                  response_format=response_format)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    jsonschema.validate(json.loads(text), WEATHER)


async def test_json_cut_short_by_max_tokens_says_length(client):
    reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                                 response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "length"
    reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100,
                                                 response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


async def test_n_choices_stream_interleaved_by_index_with_one_usage(client):
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=3, max_tokens=6, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    texts: dict[int, str] = {}
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert set(texts) == finished == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == 18 and not chunks[-1].choices
    whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=4,
                                                 extra_body={"ignore_eos": True})
    assert [c.index for c in whole.choices] == [0, 1] and whole.usage.completion_tokens == 8


async def test_chat_logprobs_have_openai_shape(client):
    reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True,
                                                 top_logprobs=3, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


async def test_completion_echo_puts_the_prompt_first_with_its_tokens_unscored(client):
    reply = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, echo=True,
                                            logprobs=2, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.text.startswith("Once upon a time") and len(choice.text) > len("Once upon a time")
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.token_logprobs[-1] is not None
    stream = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, echo=True,
                                             stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text.startswith("Once upon a time")


async def test_batched_completion_prompts_get_a_choice_each(client):
    reply = await client.completions.create(model=MODEL, prompt=["First prompt", "Second one"], n=2, max_tokens=2,
                                            extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.completion_tokens == 8


@pytest.mark.parametrize(("call", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format"),
])
async def test_what_cannot_be_answered_is_a_400_naming_the_field(client, call, param):
    with pytest.raises(BadRequestError) as raised:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, **call)
    assert raised.value.body["param"] == param


@pytest.mark.parametrize(("extra", "param"), [({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of")])
async def test_what_the_simulated_engine_lacks_is_refused_naming_it(client, extra, param):
    with pytest.raises(BadRequestError) as raised:
        await client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, **extra)
    assert raised.value.body["param"] == param


async def test_embeddings_of_one_input_or_a_batch(client):
    one = await client.embeddings.create(model=MODEL, input="The harbor at night")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 64
    assert abs(sum(v * v for v in one.data[0].embedding) - 1.0) < 1e-6, "unit length"
    batch = await client.embeddings.create(model=MODEL, input=["The harbor at night", "A meadow"], dimensions=8)
    assert [e.index for e in batch.data] == [0, 1] and len(batch.data[1].embedding) == 8
    assert batch.data[0].embedding != batch.data[1].embedding
    assert batch.usage.prompt_tokens == batch.usage.total_tokens > 0
    # The official client asks for base64 by default and decodes it: the same vector either way.
    again = await client.embeddings.create(model=MODEL, input="The harbor at night", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1e-6)


async def test_empty_embedding_input_is_a_400(client):
    with pytest.raises(BadRequestError) as refused:
        await client.embeddings.create(model=MODEL, input=[])
    assert refused.value.body["param"] == "input"


async def test_responses_api_whole_and_streamed(client):
    reply = await client.responses.create(model=MODEL, input="Tell me about the harbor", instructions="Be brief",
                                          max_output_tokens=6, store=False)
    assert reply.status in ("completed", "incomplete") and reply.output_text
    assert reply.usage.output_tokens <= 6 and reply.usage.input_tokens > 0
    assert reply.model == MODEL
    stream = await client.responses.create(model=MODEL, max_output_tokens=6, stream=True, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Tell me about the harbor"}]}])
    events = [event async for event in stream]
    assert events[0].type == "response.created"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.output_text == deltas


async def test_responses_that_need_a_stored_response_are_refused(client):
    with pytest.raises(BadRequestError) as refused:
        await client.responses.create(model=MODEL, input="more", previous_response_id="resp_123")
    assert refused.value.body["param"] == "previous_response_id"
