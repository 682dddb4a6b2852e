"""Tokenizers for the data tests: the one-character-per-token tokenizer, with and without a chat template."""

from __future__ import annotations

import copy

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tok(char_tok):
    """`char_tok` (tests/conftest.py) with a chat template."""
    tok = copy.deepcopy(char_tok)
    tok.chat_template = CHAT_TEMPLATE
    return tok
