"""The tiny random models and character tokenizer of the tests (they live in the package: the smoke config uses
them too)."""

import pytest

from lcot_mega.utils.tiny_model import (  # noqa: F401
    FAMILIES,
    SHARP_LONG,
    TINY_SHAPE,
    VOCAB,
    hf_logits,
    make_tiny_hf,
    make_tiny_model_dir,
    save_char_tokenizer,
)


def response_logprobs(hf_dir, sequences) -> list:
    """transformers' log-probs (float64) of each (prompt, response)'s response tokens: the reference the actor's are
    compared with."""
    import torch

    out = []
    for prompt, response in sequences:
        logp = torch.log_softmax(hf_logits(hf_dir, torch.tensor([prompt + response]))[0, :-1].double(), -1)
        out.append(logp[len(prompt) - 1 :].gather(-1, torch.tensor(response)[:, None])[:, 0])
    return out


GPU_TINY = dict(  # the tiny model's shape for the GPU tests (SGLang, vLLM kernels)
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,  # SGLang's attention kernels do not take the 16 of the CPU tiny models
    max_position_embeddings=2048,
    initializer_range=0.1,
)


ONE_ROUTING_BY_DEFAULT = pytest.mark.parametrize(
    "moe_dir",
    [pytest.param(True, id="norm_topk"), pytest.param(False, id="no_norm_topk", marks=pytest.mark.slow)],
    indirect=True,
)
"""For a module's `moe_dir` fixture (param: norm_topk_prob). The routing normalization changes what the router
computes, not the parallel path: tests whose cost is a layout run one routing by default, the other in slow."""
