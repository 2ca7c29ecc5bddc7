"""Tool calling with the official `openai` client, as in OpenAI's function-calling guide.

Start the gateway first: `serve run configs/local-vllm-cpu.yaml` (real vLLM on CPU, with a tool-call
parser) or `serve run configs/local.yaml` (the simulated engine). Both serve the model as `default`.
The test model has random weights: the calls it makes are well-formed, not wise.
"""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000/v1"), api_key="not-needed")
MODEL = os.environ.get("GATEWAY_MODEL", "default")

tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "pattern": "^[a-z]{1,12}$"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}]


def get_weather(city: str, unit: str) -> str:
    return json.dumps({"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit})


messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]

# The model must call a tool ("required"); "auto" lets it choose, and a named function forces that one.
completion = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=200)
call = completion.choices[0].message.tool_calls[0]
arguments = json.loads(call.function.arguments)
print("the model called", call.function.name, "with", arguments)

# Send the tool's result back; the model answers with it in the conversation.
messages.append(completion.choices[0].message.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": call.id, "content": get_weather(**arguments)})
answer = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=24)
print("the model answered:", answer.choices[0].message.content)

# Streaming: the call arrives as deltas, its name first, then its arguments in pieces.
stream = client.chat.completions.create(model=MODEL, messages=messages[:1], tools=tools, stream=True,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        max_tokens=200)
deltas = [d for chunk in stream if chunk.choices for d in chunk.choices[0].delta.tool_calls or []]
pieces = [d.function.arguments or "" for d in deltas]
print("streamed arguments:", json.loads("".join(pieces)))
