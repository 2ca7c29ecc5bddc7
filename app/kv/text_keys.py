"""Approximate prefix keys for servers whose tokenizer the gateway does not have.

Without the model's tokenizer the router cannot compute the servers' own block hashes, but prefix
affinity still works if equal prompt prefixes get equal keys. This cuts the prompt's text into
blocks of about `block_size` tokens' worth of characters and chains a hash over them, so two
prompts share exactly as many keys as they share leading character blocks. The keys never match a
server's KV events (those hash token ids), so in this mode the router learns only from what it sent.

A chat conversation is keyed on its messages in order (role and content with separators), which
keeps the property that matters: a conversation that grows by a turn extends the previous key list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import xxhash

from app.kv.hashing import BlockHash

_ROOT_SEED = 0x6170_7072_6F78  # any fixed value: keys only ever meet keys made here
_ROLE_END = "\x1f"
_MESSAGE_END = "\x1e"


def chat_key_text(messages: Iterable[Mapping[str, str]]) -> str:
    """The text a chat conversation is keyed on: each message's role and content, in order."""
    return "".join(f"{m.get('role', '')}{_ROLE_END}{m.get('content', '')}{_MESSAGE_END}" for m in messages)


class ApproximateBlockKeys:
    """Character-block keys standing in for token-block keys (same count per prompt, roughly)."""

    def __init__(self, block_size: int, chars_per_token: float) -> None:
        if block_size < 1 or chars_per_token <= 0:
            raise ValueError("block_size must be at least 1 and chars_per_token positive")
        self.chars_per_token = chars_per_token
        self.chars_per_block = max(1, round(block_size * chars_per_token))

    def block_keys(self, text: str) -> list[BlockHash]:
        """One key per full block of characters; each depends on every character before it."""
        keys: list[BlockHash] = []
        parent = _ROOT_SEED
        size = self.chars_per_block
        for start in range(0, len(text) - size + 1, size):
            parent = xxhash.xxh3_64_intdigest(text[start : start + size].encode("utf-8", "surrogatepass"),
                                              seed=parent)
            keys.append(BlockHash(parent))
        return keys

    def estimate_tokens(self, text: str) -> int:
        """The prompt's length in tokens as the cost model needs it (the server has the true count)."""
        return max(1, round(len(text) / self.chars_per_token)) if text else 0
