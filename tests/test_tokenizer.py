"""Chat prompts tokenized by segments between special tokens, with repeated segments (system prompts)
served from a cache: the tokens must be exactly those of tokenizing the whole rendered prompt."""

import random

import pytest
from tokenizers import AddedToken

from app.tokenizer import BUILTIN_TOKENIZER_DIR, SELF_CHECK_EVERY, PromptTokenizer, SegmentCache

CHARS = " \n\t<|>/abc éü漢字😀im_start<|im_end|><s></s>  "


def whole(tokenizer: PromptTokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.render_chat(messages), add_special_tokens=False)


def test_segment_tokens_equal_whole_prompt_tokens_for_any_text():
    tokenizer = PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR)
    assert tokenizer._segments is not None
    rng = random.Random(3)
    system = "You are a careful assistant. " * 20
    for _ in range(500):
        messages = [{"role": "system", "content": rng.choice([system, "".join(rng.choices(CHARS, k=300))])},
                    {"role": "user", "content": "".join(rng.choices(CHARS, k=rng.randint(0, 400)))}]
        assert tokenizer.encode_chat(messages) == whole(tokenizer, messages)
    assert system.strip() in "".join(tokenizer._segments._cache)  # the repeated system prompt is cached


def test_special_tokens_that_take_whitespace_turn_the_cache_off():
    tokenizer = PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR)
    tokenizer._tokenizer.add_special_tokens([AddedToken("<|tool|>", lstrip=True)])
    assert not SegmentCache.applies_to(tokenizer._tokenizer)


def test_a_wrong_cached_segment_is_caught_and_the_cache_turned_off():
    tokenizer = PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR)
    segments = tokenizer._segments
    messages = [{"role": "system", "content": "a system prompt that repeats " * 10}, {"role": "user", "content": "hi"}]
    for _ in range(SELF_CHECK_EVERY):
        tokenizer.encode_chat(messages)
    for text in segments._cache:
        segments._cache[text] = (0,)  # as if the tokenizer did not split cleanly at special tokens
    assert tokenizer.encode_chat(messages) == whole(tokenizer, messages)  # the self-check's own answer
    assert not segments.enabled
    assert tokenizer.encode_chat(messages) == whole(tokenizer, messages)


def test_chat_templates_render_tools_as_transformers_does():
    """vLLM renders chats through transformers: the same text, so the gateway's keys are vLLM's blocks.
    Templates print tools with `tojson`, whose transformers version neither sorts keys nor escapes HTML."""
    transformers = pytest.importorskip("transformers")
    ours = PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(BUILTIN_TOKENIZER_DIR))
    tools = [{"type": "function", "function": {"name": "get<weather>", "description": None,
                                               "parameters": {"z": {"type": "string"}, "a": "é & <b>"}}}]
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Weather?"}]
    for with_tools in (tools, None):
        expected = theirs.apply_chat_template(messages, tools=with_tools, tokenize=False, add_generation_prompt=True)
        assert ours.render_chat(messages, tools=with_tools) == expected
