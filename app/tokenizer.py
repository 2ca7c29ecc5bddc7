"""The model's tokenizer and chat template, loaded from a Hugging Face style folder.

The ingress tokenizes each prompt exactly once with this; engines use it only to turn generated
token ids back into text. It reads `tokenizer.json` and `tokenizer_config.json` (chat template,
BOS/EOS) without importing `transformers`, which keeps replicas light and fast to start.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

BUILTIN_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny-tokenizer"
"""The small byte-level BPE tokenizer this project builds itself (see app/tokenizer_build.py)."""


logger = logging.getLogger(__name__)

SEGMENT_CACHE_ENTRIES = 1024
"""Text segments (what lies between special tokens) kept with their token ids."""
MIN_CACHED_SEGMENT_CHARS = 128
LONG_TEXT_CHARS = 16_384
"""Texts longer than this go through the tokenizer's batch call, which releases the GIL while it works
(its single-text call does not): a long prompt tokenized in a worker thread then leaves the event loop
free to serve everyone else."""
SELF_CHECK_EVERY = 1000
"""One in this many cached encodings is checked against a full encode (and the cache turned off if
they ever differ), so a tokenizer whose special tokens do not split text cleanly is caught."""


class TemplateError(ValueError):
    """The chat template could not render the given messages."""


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) > LONG_TEXT_CHARS:
        return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


class SegmentCache:
    """Token ids of text segments between special tokens, for texts that repeat (system prompts).

    A Hugging Face tokenizer splits its input on added tokens before it normalizes and pre-tokenizes,
    so the text between two special tokens is tokenized on its own: a chat prompt's tokens are its
    segments' tokens joined by the special tokens' ids, and a segment seen before need not be
    tokenized again. It applies only where that holds exactly: special tokens that match raw text
    and take no whitespace with them (no lstrip, rstrip, single_word or normalized flag).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        specials = {token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items()
                    if token.special}
        self._tokenizer = tokenizer
        self._special_ids = specials
        pattern = "|".join(re.escape(content) for content in sorted(specials, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._count = 0
        self.enabled = self._split is not None

    @staticmethod
    def applies_to(tokenizer: Tokenizer) -> bool:
        return all(not (token.lstrip or token.rstrip or token.single_word or token.normalized)
                   for token in tokenizer.get_added_tokens_decoder().values() if token.special)

    def encode(self, text: str) -> list[int]:
        assert self._split is not None
        ids: list[int] = []
        for index, part in enumerate(self._split.split(text)):
            if index % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self._segment(part))
        self._count += 1
        if self._count % SELF_CHECK_EVERY == 1:
            expected = _encode(self._tokenizer, text, False)
            if expected != ids:
                self.enabled = False
                self._cache.clear()
                logger.warning("this tokenizer does not split text cleanly at its special tokens: chat prompts are "
                               "tokenized whole from now on (slower, same keys)")
                return expected
        return ids

    def _segment(self, text: str) -> tuple[int, ...] | list[int]:
        if len(text) < MIN_CACHED_SEGMENT_CHARS or len(text) > LONG_TEXT_CHARS:
            return _encode(self._tokenizer, text, False)  # too short to be worth it, or too long to keep
        cache = self._cache
        ids = cache.get(text)
        if ids is not None:
            cache.move_to_end(text)
            return ids
        ids = cache[text] = tuple(_encode(self._tokenizer, text, False))
        if len(cache) > SEGMENT_CACHE_ENTRIES:
            cache.popitem(last=False)
        return ids


class PromptTokenizer:
    """Encodes prompts and chat conversations to token ids and decodes generated ids."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any]) -> None:
        self._tokenizer = tokenizer
        self.bos_token: str | None = config.get("bos_token")
        self.eos_token: str | None = config.get("eos_token")
        template = config.get("chat_template")
        # The environment transformers renders chat templates in (and so vLLM): the same text for the same
        # conversation, which is what makes the router's keys the engine's blocks.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = _strftime_now
        self._chat_template = env.from_string(template) if template else None
        self._segments = SegmentCache(tokenizer) if SegmentCache.applies_to(tokenizer) else None

    @classmethod
    def from_dir(cls, path: str | Path) -> PromptTokenizer:
        folder = Path(path)
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), config)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (at least 1), for a cheap bound on a text's length
        in tokens: a byte-level token of k bytes covers at most k characters."""
        longest = max((len(token) for token in self._tokenizer.get_vocab(with_added_tokens=True)), default=1)
        return max(1, longest)

    @cached_property
    def eos_token_id(self) -> int | None:
        return self._tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        decoder = self._tokenizer.get_added_tokens_decoder()
        return frozenset(idx for idx, token in decoder.items() if token.special)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return _encode(self._tokenizer, text, add_special_tokens)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """`tools`: the request's tool definitions, given to the template as vLLM gives them (only when the
        request has some, so a template's `tools is defined` reads alike)."""
        if self._chat_template is None:
            raise TemplateError("this model's tokenizer has no chat template; use /v1/completions")
        extra = {"tools": tools} if tools else {}
        return self._chat_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        # The template writes BOS itself, so the post-processor must not add a second one.
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        if self._segments is not None and self._segments.enabled:
            return self._segments.encode(text)
        return self.encode(text, add_special_tokens=False)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; chat templates are written for this one.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Byte-level BPE can split one character over several tokens; a delta is held back while the
    decoded tail is an incomplete character (U+FFFD), as vLLM does.
    """

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]
