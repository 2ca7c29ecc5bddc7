"""Structured outputs with the official `openai` client: a JSON schema from a pydantic model, parsed.

Start the gateway first: `serve run configs/local-vllm-cpu.yaml` (vLLM constrains the output with its
grammar) or `serve run configs/local.yaml` (the simulated engine answers JSON valid for the schema).
The test model has random weights: the answer is valid, not true.
"""

import os
from typing import Annotated, Literal

from openai import OpenAI
from pydantic import BaseModel, Field

client = OpenAI(base_url=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000/v1"), api_key="not-needed")
MODEL = os.environ.get("GATEWAY_MODEL", "default")


# Bounded strings keep a random-weight model's answer short; a real model needs none of it.
class CalendarEvent(BaseModel):
    name: str = Field(pattern="^[a-z ]{1,20}$")
    day: Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    participants: list[Annotated[str, Field(pattern="^[a-z]{1,10}$")]] = Field(max_length=3)


# The client turns the model into a json_schema response_format and parses the answer back into it.
completion = client.chat.completions.parse(
    model=MODEL,
    messages=[{"role": "system", "content": "Extract the event information."},
              {"role": "user", "content": "Alice and Bob are going to a science fair on Friday."}],
    response_format=CalendarEvent,
    max_tokens=300,
)
event = completion.choices[0].message.parsed
print("parsed:", event)

# JSON mode: any JSON object.
reply = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Describe the fair as JSON."}],
    response_format={"type": "json_object"}, max_tokens=100)
print("json_object:", reply.choices[0].message.content)
