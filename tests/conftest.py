"""Shared fixtures: the real SmolLM2 tokenizer (loaded once per session; ~11 s offline)."""

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from pema.owner.plm import SMOLLM2_GGUF, load_tokenizer

    return load_tokenizer(SMOLLM2_GGUF)
