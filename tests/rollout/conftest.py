"""Shared rollout fixtures: a sharp tiny Llama with a character tokenizer, a second model, an engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.tiny_models import SHARP_LONG as MODEL
from helpers.tiny_models import make_tiny_hf, save_char_tokenizer

from lcot_mega.rollout.embedded import EmbeddedEngine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = make_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama", **MODEL)
    save_char_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("other"), "llama", seed=1, **MODEL)


@pytest.fixture(scope="module")
def engine(model_dir) -> EmbeddedEngine:
    return EmbeddedEngine(model_dir)
