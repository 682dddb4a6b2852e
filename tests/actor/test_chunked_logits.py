"""Log-probs and entropy from hidden states a chunk at a time equal those of the full logits (torch's
log_softmax and -sum p log p on h W^T / T, an independent reference), gradients included, on one rank and
split over two tensor-parallel ranks; and their memory does not grow with tokens x vocabulary.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.distributed_harness import run_gloo

pytest.importorskip("megatron.core")

VOCAB, PADDED, HIDDEN, TOKENS, TEMPERATURE = 9, 10, 6, 11, 0.7


def _inputs() -> dict[str, torch.Tensor]:
    """Hidden states [N, h], an output weight [V_pad, h] (its last row is vocabulary padding), labels and the
    weights of log p and H in the loss."""
    g = torch.Generator().manual_seed(0)
    return {
        "hidden": torch.randn(TOKENS, HIDDEN, generator=g),
        "weight": 2 * torch.randn(PADDED, HIDDEN, generator=g),
        "labels": torch.randint(0, VOCAB, (TOKENS,), generator=g),
        "a": torch.randn(TOKENS, generator=g),
        "b": torch.randn(TOKENS, generator=g),
    }


def _reference(terms: str) -> tuple[torch.Tensor, ...]:
    """log p, H and the gradients of sum(a log p + b H) from the full logits, with torch's own ops."""
    x = _inputs()
    hidden, weight = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
    z = hidden @ weight[:VOCAB].t() / TEMPERATURE  # [N, V]
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(-1, x["labels"].unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    loss = (x["a"] * logp).sum() * ("logp" in terms) + (x["b"] * entropy).sum() * ("entropy" in terms)
    loss.backward()
    return logp.detach(), entropy.detach(), hidden.grad, weight.grad


def _chunked_worker(rank: int, world: int, cases: list[tuple[int, str, bool]]) -> dict:
    """Per (chunk, terms, frozen weight): log p, H and the gradients on this TP rank (its weight slice)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.chunked_logits import chunked_token_stats
    from lcot_mega.config import ActorConfig

    torch.set_num_threads(1)
    ma.init_parallel(ActorConfig(tensor_parallel=world), seed=1)
    out = {}
    for chunk, terms, frozen in cases:
        x = _inputs()
        hidden = x["hidden"].requires_grad_()
        weight = x["weight"].chunk(world)[rank].clone().requires_grad_(not frozen)
        logp, entropy = chunked_token_stats(
            copy_to_tensor_model_parallel_region(hidden), weight, x["labels"], TEMPERATURE, VOCAB, chunk
        )
        loss = 0.0
        if "logp" in terms:
            loss = loss + (x["a"] * logp).sum()
        if "entropy" in terms:
            loss = loss + (x["b"] * entropy).sum()
        loss.backward()
        out[chunk, terms, frozen] = (logp.detach(), entropy.detach(), hidden.grad, weight.grad)
    ma.destroy_parallel()
    return out


def _check(per_rank: list[dict]) -> None:
    world = len(per_rank)
    for rank, results in enumerate(per_rank):
        for (chunk, terms, frozen), (logp, entropy, grad_h, grad_w) in results.items():
            where = (rank, chunk, terms, frozen)
            ref_logp, ref_entropy, ref_grad_h, ref_grad_w = _reference(terms)
            assert torch.allclose(logp, ref_logp, rtol=0, atol=1e-5), where
            assert torch.allclose(entropy, ref_entropy, rtol=0, atol=1e-5), where
            assert torch.allclose(grad_h, ref_grad_h, rtol=0, atol=1e-5), where  # summed over TP by the copy
            if frozen:
                assert grad_w is None, where
            else:
                want = ref_grad_w.chunk(world)[rank]
                assert torch.allclose(grad_w, want, rtol=0, atol=1e-5), where
    assert (ref_grad_w[VOCAB:] == 0).all()  # the padding row gets no gradient in the reference either


CASES = [
    (1, "logp+entropy", False),
    (4, "logp+entropy", False),  # chunks of 4, 4, 3
    (64, "logp+entropy", False),  # one chunk larger than the input
    (4, "logp", False),  # the entropy unused: no gradient reaches it
    (4, "entropy", False),
    (3, "logp", True),  # frozen output weight: only the hidden states get a gradient
]


def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits_on_one_rank():
    _check(run_gloo(_chunked_worker, 1, CASES))


def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits_over_two_tp_ranks():
    # rank 1's slice holds the padding row; labels fall in both slices
    labels = _inputs()["labels"]
    assert (labels < PADDED // 2).any() and (labels >= PADDED // 2).any()
    _check(run_gloo(_chunked_worker, 2, CASES[1:2] + CASES[3:]))


def test_bad_settings_are_refused():
    from lcot_mega.actor.chunked_logits import chunked_token_stats

    x = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        chunked_token_stats(x["hidden"], x["weight"], x["labels"], 0.0, VOCAB, 4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_stats(x["hidden"], x["weight"], x["labels"], 1.0, VOCAB, 0)


# ------------------------------------------------------------------------------------------------------ memory

_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    import torch.distributed as dist
    torch.set_num_threads(1)

    def peak_bytes():  # VmHWM: reset at exec (ru_maxrss keeps the parent's peak)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024

    tokens, vocab, hidden_size = 2048, 49152, 576  # SmolLM2-135M's vocabulary and width
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, hidden_size, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    if sys.argv[1] == "chunked":
        from lcot_mega.actor import megatron_adapter as ma
        from lcot_mega.actor.chunked_logits import chunked_token_stats
        from lcot_mega.config import ActorConfig
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
        dist.init_process_group("gloo", rank=0, world_size=1)
        ma.init_parallel(ActorConfig(), seed=1)
        def stats(h, w, y):
            return chunked_token_stats(h, w, y, 1.0, vocab, 256)
    else:  # the full logits, as the model's output layer hands them to a log-softmax
        def stats(h, w, y):
            log_p = torch.log_softmax(h @ w.t(), dim=-1)
            return log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)
    logp, entropy = stats(hidden[:8], weight, labels[:8])  # warm up the kernels' one-off allocations
    (logp.sum() + entropy.sum()).backward()
    hidden.grad = weight.grad = None
    before = peak_bytes()
    logp, entropy = stats(hidden, weight, labels)
    (logp.sum() + entropy.sum()).backward()
    print(json.dumps(peak_bytes() - before))
    """
)


def _peak_growth_bytes(which: str) -> int:
    """Growth of the peak resident memory over one forward + backward, measured in a fresh process."""
    from lcot_mega.utils.distributed import free_port

    argv = [sys.executable, "-c", _PEAK_SCRIPT, which, str(free_port())]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_memory_does_not_grow_with_tokens_times_vocabulary():
    logits_bytes = 2048 * 49152 * 4  # one fp32 [tokens, V] tensor: 384 MiB
    full = _peak_growth_bytes("full")
    assert full >= 2 * logits_bytes  # the measurement sees the full logits (and their softmax)
    chunked = _peak_growth_bytes("chunked")
    # a few [256, V] chunks (48 MiB each) and the [V, h] weight gradient (108 MiB); measured 1.8 GiB vs 58 MiB
    assert chunked < min(logits_bytes, full / 6), (chunked / 2**20, full / 2**20)
