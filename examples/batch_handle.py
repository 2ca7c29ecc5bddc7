"""Call the gateway from a Python batch job through Serve handles, without HTTP.

Start the gateway (serve run configs/local.yaml), then in another shell:
    RAY_AUTH_MODE=disabled python examples/batch_handle.py
"""

import asyncio

import ray
from ray import serve

from app.openai.errors import APIError


async def main() -> None:
    ray.init(address="auto", log_to_driver=False)
    gateway = serve.get_app_handle("gateway")

    # Many requests at once: each call returns a response future.
    prompts = [f"Summarize document {i}." for i in range(8)]
    responses = [
        gateway.chat.remote({"model": "sim-llama", "messages": [{"role": "user", "content": p}], "max_tokens": 12})
        for p in prompts
    ]
    for prompt, response in zip(prompts, responses, strict=True):
        reply = await response
        print(prompt, "->", reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"])

    # Streaming: chunks arrive as OpenAI chunk dicts.
    stream = gateway.options(stream=True).chat_stream.remote(
        {"model": "sim-llama", "messages": [{"role": "user", "content": "Stream please."}], "max_tokens": 8}
    )
    async for chunk in stream:
        if chunk["choices"]:
            print(chunk["choices"][0]["delta"].get("content", ""), end="")
    print()

    # Bad input raises APIError with the HTTP status the REST API would have sent.
    try:
        await gateway.chat.remote({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    except APIError as error:
        print("error:", error.status_code, error.message)


if __name__ == "__main__":
    asyncio.run(main())
