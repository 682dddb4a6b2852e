"""The tiny random models and character tokenizer of the tests (they live in the package: the smoke config uses
them too)."""

from lcot_mega.models.tiny import (  # noqa: F401
    FAMILIES,
    SHARP_LONG,
    TINY_SHAPE,
    VOCAB,
    hf_logits,
    make_tiny_hf,
    make_tiny_model_dir,
    save_char_tokenizer,
)
