"""A cheap streamed-chat client for load generation: aiohttp's C parser, and JSON parsed only until
the first token and for the usage chunk, so that the load generator spends little of the machine's
CPU that the routers under test share with it.
"""

from __future__ import annotations

import json
import time

import aiohttp

from benchmarks.routing_live import Sample

__all__ = ["Sample", "new_session", "stream_chat"]


def new_session(connections: int = 2000) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        timeout=aiohttp.ClientTimeout(total=900),
    )


def _first_content(chunk: dict) -> bool:
    choices = chunk.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    delta = choice.get("delta")
    return bool((delta.get("content") or delta.get("reasoning_content")) if delta else choice.get("text"))


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict, *, want_text: bool = False
                      ) -> tuple[Sample, str]:
    """One streamed request (chat or completion): TTFT, end to end, usage; the answer text if asked."""
    sample = Sample()
    texts: list[str] = []
    start = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                sample.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return sample, ""
            async for raw in response.content:
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    continue
                first = sample.ttft_s is None
                if not (first or want_text or b'"usage":{' in data or b'"error"' in data):
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    sample.error = str(chunk["error"])[:200]
                    return sample, ""
                usage = chunk.get("usage")
                if usage:
                    sample.prompt_tokens = usage.get("prompt_tokens") or 0
                    sample.output_tokens = usage.get("completion_tokens") or 0
                    sample.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                if first and _first_content(chunk):
                    sample.ttft_s = time.perf_counter() - start
                if want_text:
                    for choice in chunk.get("choices") or []:
                        texts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    except (aiohttp.ClientError, TimeoutError) as error:
        sample.error = f"{type(error).__name__}: {error}"
        return sample, ""
    sample.e2e_s = time.perf_counter() - start
    return sample, "".join(texts)
