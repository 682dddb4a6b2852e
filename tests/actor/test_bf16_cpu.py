"""bf16 actor on CPU (the quick start's precision): bf16 weights and compute, fp32 master weights in the optimizer."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import SHARP_LONG, hf_logits, make_tiny_hf

pytest.importorskip("megatron.core")


def _bf16_actor_run(rank: int, world_size: int, hf_dir: str, sequences) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    actor = MegatronActor(arch, ActorConfig(precision="bf16", lr=3e-3), AlgoConfig(), hf_dir)
    dtypes = {n: p.dtype for chunk in actor.chunks for n, p in chunk.named_parameters()}
    before = actor.compute_logprobs(sequences)
    batch = TrainBatch([s[0] for s in sequences], [s[1] for s in sequences], advantages=[1.0, -1.0])
    metrics = [actor.train_step(batch) for _ in range(5)]
    after = actor.compute_logprobs(sequences)
    return {"dtypes": dtypes, "before": before, "after": after, "metrics": metrics}


def test_bf16_actor_matches_fp32_transformers_and_learns_on_cpu(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path, "llama", **SHARP_LONG))
    sequences = [([1, 5, 9, 13], [20, 30, 40, 50, 60]), ([2, 6, 10], [70, 80, 11, 12])]
    (out,) = run_gloo(_bf16_actor_run, 1, hf_dir, sequences)
    fp32 = [n for n, d in out["dtypes"].items() if d != torch.bfloat16]
    assert fp32 and all("layernorm" in n for n in fp32), fp32  # megatron-core's torch-norm fallback keeps fp32
    for (prompt, response), got in zip(sequences, out["before"], strict=True):
        ids = torch.tensor([prompt + response])
        ref = torch.log_softmax(hf_logits(hf_dir, ids)[0, :-1].double(), -1)  # fp32 transformers, [T-1, V]
        want = ref[len(prompt) - 1 :].gather(-1, torch.tensor(response)[:, None])[:, 0]
        # bf16 has 8 mantissa bits: about 1% relative error in log-probs of -10..-0.1
        assert torch.allclose(got.double(), want, rtol=0.03, atol=0.05), (got - want).abs().max()
    for m in out["metrics"]:
        assert m["actor/update_ok"] == 1.0 and m["actor/grad_norm"] == m["actor/grad_norm"]  # not NaN
    # the fp32 master weights accumulate updates that bf16 alone would round away: the positive sequence
    # gains log-probability and the negative one loses it
    assert out["after"][0].sum() > out["before"][0].sum() + 0.5
    assert out["after"][1].sum() < out["before"][1].sum() - 0.5


def _frozen_embeddings_run(rank: int, world_size: int, hf_dir: str) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    actor = MegatronActor(arch, ActorConfig(freeze_embeddings=True, lr=1e-2), AlgoConfig(), hf_dir)
    before = {n: p.detach().clone() for n, p in actor.chunks[0].module.named_parameters()}
    batch = TrainBatch([[1, 5, 9]], [[20, 30, 40]], advantages=[1.0])
    for _ in range(3):
        actor.train_step(batch)
    return {n: bool(torch.equal(p, before[n])) for n, p in actor.chunks[0].module.named_parameters()}


def test_frozen_embeddings_stay_put_while_the_rest_trains(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path, "llama", tie=True, **SHARP_LONG))
    (unchanged,) = run_gloo(_frozen_embeddings_run, 1, hf_dir)
    assert unchanged["embedding.word_embeddings.weight"]
    trained = [n for n, same in unchanged.items() if not same]
    assert trained and all("word_embeddings" not in n for n in trained)
    assert any("linear_qkv" in n for n in trained)


def _one_update_run(rank: int, world_size: int, hf_dir: str, precision: str, sequences) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    actor = MegatronActor(arch, ActorConfig(precision=precision, lr=1e-5), AlgoConfig(), hf_dir)
    params = {n: p for chunk in actor.chunks for n, p in chunk.module.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    logprobs = actor.compute_logprobs(sequences)
    actor.train_step(TrainBatch([s[0] for s in sequences], [s[1] for s in sequences], advantages=[1.0, -1.0]))
    return {
        "dtypes": {n: p.dtype for n, p in params.items()},
        "delta": torch.cat([(p.detach() - before[n]).flatten() for n, p in params.items()]),
        "logprobs": logprobs,
    }


def test_bf16_autocast_keeps_fp32_weights_and_applies_every_small_update(tmp_path):
    """actor.precision = bf16_autocast: bf16 products, fp32 parameters. An lr-1e-5 Adam step, far below a bf16
    weight's resolution, must move the weights as the fp32 actor's step does (a bf16 parameter would not move)."""
    hf_dir = str(make_tiny_hf(tmp_path, "llama", **SHARP_LONG))
    sequences = [([1, 5, 9, 13], [20, 30, 40, 50, 60]), ([2, 6, 10], [70, 80, 11, 12])]
    (auto,) = run_gloo(_one_update_run, 1, hf_dir, "bf16_autocast", sequences)
    (fp32,) = run_gloo(_one_update_run, 1, hf_dir, "fp32", sequences)
    assert set(auto["dtypes"].values()) == {torch.float32}
    for got, want in zip(auto["logprobs"], fp32["logprobs"], strict=True):
        assert torch.allclose(got, want, rtol=0.03, atol=0.05), (got - want).abs().max()  # bf16 products
        assert not torch.equal(got, want)  # the products really ran in bf16
    a, f = auto["delta"].double(), fp32["delta"].double()
    assert f.norm() > 0
    assert 0.8 < a.norm() / f.norm() < 1.25
    assert torch.nn.functional.cosine_similarity(a, f, dim=0) > 0.9
