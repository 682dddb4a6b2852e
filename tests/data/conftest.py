"""Tokenizers for the data tests: the one-character-per-token tokenizer, with and without a chat template."""

from __future__ import annotations

import pytest
from helpers.tiny_models import save_char_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="session")
def char_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("char_tok")
    save_char_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="session")
def chat_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat_tok")
    save_char_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT_TEMPLATE
    return tok
