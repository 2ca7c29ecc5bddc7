"""Talk to the gateway with the official `openai` client (start it first: serve run configs/local.yaml)."""

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="not-needed")

print([model.id for model in client.models.list()])

reply = client.chat.completions.create(
    model="sim-llama",
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=16,
)
print(reply.choices[0].message.content, reply.usage)

stream = client.chat.completions.create(
    model="sim-llama",
    messages=[{"role": "user", "content": "Count to five."}],
    max_tokens=16,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print("\nusage:", chunk.usage)
