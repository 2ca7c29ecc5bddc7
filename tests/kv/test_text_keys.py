"""Approximate prefix keys, used when the gateway has no tokenizer for a model."""

from app.kv.text_keys import ApproximateBlockKeys, chat_key_text

KEYS = ApproximateBlockKeys(block_size=16, chars_per_token=4.0)  # 64 characters per key


def test_prompts_share_as_many_keys_as_leading_blocks():
    shared = "x" * 64 * 3
    a = KEYS.block_keys(shared + "a" * 100)
    b = KEYS.block_keys(shared + "b" * 100)
    assert len(a) == len(b) == 4  # 292 characters: 4 full blocks, the tail is not keyed
    assert a[:3] == b[:3] and a[3] != b[3]
    assert KEYS.block_keys("y" + shared[1:])[0] != a[0]  # a key depends on every character before it
    assert KEYS.block_keys("short") == []


def test_a_conversation_that_grows_keeps_its_earlier_keys():
    system = {"role": "system", "content": "You are a terse assistant for the billing team. " * 4}
    first = [system, {"role": "user", "content": "What is my balance on the main account today?"}]
    grown = [*first, {"role": "assistant", "content": "It is 42."}, {"role": "user", "content": "And yesterday?"}]
    before, after = KEYS.block_keys(chat_key_text(first)), KEYS.block_keys(chat_key_text(grown))
    assert before and after[: len(before)] == before
    # The role is part of the key: the same words from the user are another prefix.
    as_user = KEYS.block_keys(chat_key_text([{"role": "user", "content": system["content"]}]))
    assert as_user[0] != before[0]


def test_token_estimate_follows_the_character_ratio():
    assert KEYS.estimate_tokens("") == 0
    assert KEYS.estimate_tokens("abc") == 1
    assert KEYS.estimate_tokens("a" * 400) == 100
    assert ApproximateBlockKeys(block_size=16, chars_per_token=3.0).chars_per_block == 48
