"""Actor log-probs and entropy equal transformers' (log_softmax(logits / T) at the targets) in every layout."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tensor_helpers import one_thread
from helpers.tiny_models import FAMILIES, make_tiny_hf

from lcot_mega.actor.batching import plan_micro_batches
from lcot_mega.bridge.arch import ArchSpec, arch_from_hf_config

pytest.importorskip("megatron.core")


TEMPERATURE = 0.7
MICRO_BATCH_TOKENS = 24  # several micro-batches, padded to different lengths
LLAMA_VOCAB = 95  # not a multiple of 2: at TP=2 the last rank holds one padding column that must get -inf


CHUNK4, FULL = dict(logits_chunk_tokens=4), dict(logits_chunk_tokens=0)
PACKED = dict(logits_chunk_tokens=4, pack_sequences=True)
"""Extra actor settings of a layout: chunked log-probs (several chunks per micro-batch), the full logits, packing."""


def _sequences(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Ragged prompts (1-7 tokens) and responses (0-12 tokens), token ids valid for every tiny model; at 24
    tokens per micro-batch and DP=2 the second rank runs an empty micro-batch."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 12), (1, 5), (7, 0), (2, 9), (5, 1), (4, 7), (6, 3), (1, 2)]
    return [
        (
            torch.randint(0, LLAMA_VOCAB, (p,), generator=g).tolist(),
            torch.randint(0, LLAMA_VOCAB, (r,), generator=g).tolist(),
        )
        for p, r in shapes
    ]


def _models(tmp_path) -> dict[str, tuple[str, ArchSpec]]:
    """family -> (HF dir, arch); qwen3 with tied embeddings, llama with an odd vocabulary."""
    from transformers import AutoConfig

    out = {}
    for f in FAMILIES:
        hf_dir = make_tiny_hf(
            tmp_path / f, f, tie=f == "qwen3", **({"vocab_size": LLAMA_VOCAB} if f == "llama" else {})
        )
        out[f] = (str(hf_dir), arch_from_hf_config(AutoConfig.from_pretrained(hf_dir)))
    return out


@torch.no_grad()
def _transformers_logprobs(hf_dir: str, sequences, temperature: float) -> tuple[list, list]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    logprobs, entropies = [], []
    for prompt, response in sequences:
        logits = model(torch.tensor([prompt + response])).logits[0]  # [L, V]
        z = logits[len(prompt) - 1 : len(prompt) + len(response) - 1] / temperature  # [R, V]
        logprobs.append(z.log_softmax(-1).gather(-1, torch.tensor(response, dtype=torch.long)[:, None])[:, 0])
        entropies.append(torch.distributions.Categorical(logits=z).entropy())
    return logprobs, entropies


def _entropy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [2, 3, 8] whose last column is vocabulary padding (-inf), and loss weights [2, 3]."""
    g = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(2, 3, 8, generator=g)
    z[..., -1] = float("-inf")
    return z, torch.randn(2, 3, generator=g)


def _entropy_and_grad(z_full: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This TP rank's entropy and gradient of sum(weights * H) w.r.t. its vocabulary slice."""
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.logprobs import vocab_parallel_entropy

    group = ma.tensor_parallel_group()
    z = z_full.chunk(group.size(), dim=-1)[group.rank()].clone().requires_grad_()
    entropy = vocab_parallel_entropy(z)
    (weights * entropy).sum().backward()
    return entropy.detach(), z.grad


def _actor_logprobs(rank: int, world: int, models: dict, layouts: list, sequences, temperature: float) -> dict:
    """Per (layout, family): the actor's per-sequence log-probs and entropy on this rank; at TP > 1 also
    (layout, "entropy"): the vocab-parallel entropy and its gradient on `_entropy_inputs()`."""
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)  # tiny matrices: more threads only oversubscribe the cores (10x slower when busy)
    out = {}
    for name, tp, pp, extra in layouts:
        cfg = ActorConfig(tensor_parallel=tp, pipeline_parallel=pp, micro_batch_tokens=MICRO_BATCH_TOKENS, **extra)
        for family, (hf_dir, arch) in models.items():
            actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
            result = actor.compute_logprobs_and_entropy(sequences, temperature)
            out[name, family] = (result.logprobs, result.entropy)
        if tp > 1:
            out[name, "entropy"] = _entropy_and_grad(*_entropy_inputs())
        ma.destroy_parallel()  # the next layout re-initializes megatron-core's parallel state in this process
    return out


def _check(per_rank: list[dict], models: dict, sequences) -> None:
    with one_thread():
        expected = {f: _transformers_logprobs(d, sequences, TEMPERATURE) for f, (d, _) in models.items()}
    for rank, results in enumerate(per_rank):
        for (layout, family), (logprobs, entropy) in results.items():
            if family == "entropy":
                continue
            ref_logp, ref_ent = expected[family]
            assert [t.shape for t in logprobs] == [t.shape for t in ref_logp]
            for i, (got, want) in enumerate(zip(logprobs, ref_logp, strict=True)):
                assert torch.allclose(got, want, rtol=0, atol=1e-5), (rank, layout, family, i, (got - want).abs().max())
            for i, (got, want) in enumerate(zip(entropy, ref_ent, strict=True)):
                assert torch.allclose(got, want, rtol=0, atol=1e-5), (rank, layout, family, i, "entropy")


def _check_entropy_gradient(per_rank: list[dict]) -> None:
    """The TP=2 ranks' vocab-parallel entropy and gradient against the full-vocabulary ones (padding included)."""
    from lcot_mega.algo import entropy_from_logits

    z, weights = _entropy_inputs()
    z = z.requires_grad_()
    entropy = entropy_from_logits(z)
    (weights * entropy).sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad[..., -1] == 0).all()
    for rank, results in enumerate(per_rank):
        got, grad = results["tp2", "entropy"]
        assert torch.allclose(got, entropy.detach(), rtol=0, atol=1e-6), rank
        assert torch.allclose(grad, z.grad.chunk(2, dim=-1)[rank], rtol=0, atol=1e-6), rank


def test_logprobs_equal_transformers_at_tp1(tmp_path):
    models, sequences = _models(tmp_path), _sequences()
    # log-probs from hidden states 4 tokens at a time, from full logits, and over packed micro-batches
    layouts = [("tp1", 1, 1, CHUNK4), ("tp1_full_logits", 1, 1, FULL), ("tp1_packed", 1, 1, PACKED)]
    _check(run_gloo(_actor_logprobs, 1, models, layouts, sequences, TEMPERATURE), models, sequences)


def test_logprobs_equal_transformers_at_tp2_pp2_dp2_on_every_rank(tmp_path):
    # one launch, three layouts in turn (a gloo launch costs seconds)
    models, sequences = _models(tmp_path), _sequences()
    layouts = [
        ("tp2", 2, 1, dict(logits_chunk_tokens=3)),
        ("tp2_full_logits", 2, 1, FULL),
        ("tp2_packed", 2, 1, PACKED),
        ("pp2", 1, 2, {}),
        ("pp2_packed", 1, 2, PACKED),
        ("dp2", 1, 1, dict(logits_chunk_tokens=5, pack_sequences=True)),
    ]
    assert [] in plan_micro_batches([len(p) + len(r) for p, r in sequences], 2, MICRO_BATCH_TOKENS)[1]
    per_rank = run_gloo(_actor_logprobs, 2, models, layouts, sequences, TEMPERATURE)
    _check(per_rank, models, sequences)
    # the same launch: the entropy's gradient (used by the entropy bonus) is right across the vocabulary split
    _check_entropy_gradient(per_rank)


def test_logprobs_equal_transformers_at_cp2_on_every_rank(tmp_path):
    """Each sequence cut over two context-parallel ranks (rows padded to a multiple of 4): both ranks return the
    whole-sequence log-probs and entropy, equal to transformers' (true rotary positions, attention across ranks)."""
    models, sequences = _models(tmp_path), _sequences()
    layouts = [
        ("cp2", 1, 1, dict(context_parallel=2, logits_chunk_tokens=3)),
        ("cp2_full_logits", 1, 1, dict(context_parallel=2, **FULL)),
    ]
    _check(run_gloo(_actor_logprobs, 2, models, layouts, sequences, TEMPERATURE), models, sequences)
