"""Settings every test needs: Ray without token auth or usage reporting, and the built-in tokenizer."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

import pytest

from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PromptTokenizer:
    return PromptTokenizer.from_dir(BUILTIN_TOKENIZER_DIR)
