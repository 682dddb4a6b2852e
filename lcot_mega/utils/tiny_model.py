"""Tiny random Hugging Face models of each supported family and a character tokenizer, made on the fly.

No hub access: the smoke config (configs/tiny_cpu.yaml, via tools/make_tiny_model.py) and the tests build
their models here in a second.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3")
VOCAB = 96
TINY_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
"""4 layers, GQA (4 query heads over 2 key/value groups), head_dim 16: TP=2 and PP=2 both split it."""
SHARP_LONG = {"initializer_range": 0.2, "max_position_embeddings": 4096}
"""Sharp random weights (log-probs from -10 to -0.1 instead of a near-uniform log(1/96), so a wrong token or a
shifted position cannot hide) and long positions, for the rollout tests."""


def make_tiny_hf(out_dir: str | Path, model_type: str, *, tie: bool = False, seed: int = 0, **overrides) -> Path:
    """Save a tiny random `model_type` model (fp32 safetensors + config) to `out_dir` and return it.

    4 layers, GQA (4 query heads over 2 key/value groups), head_dim 16, so TP=2 and PP=2 both split it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY_SHAPE, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).float()
    with torch.no_grad():  # random norms and biases, so a mapping mistake there cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir)
    return Path(out_dir)


TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
"""The experts of the tiny `qwen3_moe` model: 4 per layer, top-2, renormalized as Qwen3-30B-A3B's config does."""


TINY_SHARED_EXPERT = dict(TINY_MOE, norm_topk_prob=False, shared_expert_intermediate_size=48)
"""The tiny `qwen2_moe` model: the same experts, not renormalized (Qwen2-MoE's default), plus a gated shared expert."""
MOE_FAMILIES = {"qwen3_moe": TINY_MOE, "qwen2_moe": TINY_SHARED_EXPERT}


def make_tiny_model_dir(out_dir: str | Path, model_type: str = "llama", seed: int = 0) -> Path:
    """A tiny random model with the character tokenizer: a complete model directory for smoke runs."""
    moe = MOE_FAMILIES.get(model_type, {})
    out = make_tiny_hf(out_dir, model_type, seed=seed, **SHARP_LONG, **moe)
    save_char_tokenizer(out)
    return out


def hf_logits(hf_dir: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids).logits


def save_char_tokenizer(out_dir: str | Path) -> None:
    """A tokenizer of one character per token over the tiny models' 96 ids: <pad>, <s>, </s>, then letters,
    digits, punctuation; a space reads as <pad> (so engines with text and stop strings work offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = (string.ascii_letters + string.digits + string.punctuation.replace("\\", ""))[: VOCAB - 3]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
