import pytest

from app.openai.models import ModelEntry, ModelRegistry, UnknownModelError


def test_names_and_aliases_resolve_to_the_served_name():
    registry = ModelRegistry([ModelEntry("llama", ("default", "chat")), ModelEntry("qwen")])
    assert registry.resolve("llama") == "llama"
    assert registry.resolve("default") == "llama"
    assert registry.resolve("qwen") == "qwen"
    assert registry.names == ["llama", "qwen"]


def test_unknown_name_lists_what_is_served():
    registry = ModelRegistry([ModelEntry("llama")])
    with pytest.raises(UnknownModelError) as raised:
        registry.resolve("gpt-4")
    assert raised.value.available == ["llama"]


def test_a_name_used_twice_is_rejected():
    with pytest.raises(ValueError, match="used twice"):
        ModelRegistry([ModelEntry("a", ("b",)), ModelEntry("b")])
