"""Activation recompute changes what is stored, never the numbers: one train step under actor.recompute = full
(1 and 2 layers a block) and selective gives the loss, gradient norm and updated weights of the run without it,
on one rank and at TP=2. Also the settings that cannot work are refused before any model is built.
"""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import make_tiny_hf
from helpers.train_batches import random_train_batch

from lcot_mega.config import ActorConfig, AlgoConfig

pytest.importorskip("megatron.core")

OPTIM = dict(lr=1e-3, adam_eps=1e-4, micro_batch_tokens=24, logits_chunk_tokens=5)
SETTINGS = [
    dict(recompute="none"),
    dict(recompute="full"),
    dict(recompute="full", recompute_layers=2),
    dict(recompute="selective", attention="local"),  # megatron's core_attn recompute: the local spec's attention
    dict(recompute="none", attention="local"),
]
FROZEN = [dict(recompute="none", freeze_embeddings=True), dict(recompute="full", freeze_embeddings=True)]
"""Frozen embeddings: the checkpointed layers' input needs no gradient of its own (they must train anyway)."""


def _step_worker(rank: int, world: int, hf_dir: str, settings: list[dict] = SETTINGS) -> list[tuple[dict, dict]]:
    """Per setting: (metrics of one train step, the weights after it) on this rank."""
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    out = []
    for setting in settings:
        cfg = ActorConfig(tensor_parallel=world, **(OPTIM | setting))
        actor = MegatronActor(arch, cfg, AlgoConfig(entropy_coef=0.1), hf_dir)
        config = ma.unwrap(actor.chunks[0]).config
        assert config.recompute_granularity == (None if setting["recompute"] == "none" else setting["recompute"])
        metrics = actor.train_step(random_train_batch(0))
        weights = {n: p.detach().clone() for c in actor.chunks for n, p in ma.unwrap(c).named_parameters()}
        out.append((metrics, weights))
        ma.destroy_parallel()
    return out


def _check(per_rank: list, settings: list[dict] = SETTINGS) -> None:
    for rank, results in enumerate(per_rank):
        base_metrics, base_weights = results[0]
        assert base_metrics["actor/update_ok"] == 1.0
        for setting, (metrics, weights) in zip(settings[1:], results[1:], strict=True):
            where = (rank, setting)
            for key in ("actor/loss", "actor/grad_norm", "actor/entropy"):
                assert metrics[key] == pytest.approx(base_metrics[key], rel=1e-5, abs=1e-7), (*where, key)
            for name, w in weights.items():
                assert torch.allclose(w, base_weights[name], rtol=0, atol=1e-6), (*where, name)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return str(make_tiny_hf(tmp_path_factory.mktemp("tiny"), "qwen2"))


def test_recompute_gives_the_same_step_on_one_rank(hf_dir):
    _check(run_gloo(_step_worker, 1, hf_dir))


def test_full_recompute_trains_every_layer_with_frozen_embeddings(hf_dir):
    per_rank = run_gloo(_step_worker, 1, hf_dir, FROZEN)
    _check(per_rank, FROZEN)
    (_, moved), start = per_rank[0][1], _initial_weights(hf_dir)
    layer = next(n for n in moved if "decoder.layers.0" in n and "linear_fc1" in n)
    assert not torch.equal(moved[layer], start[layer])  # the first layer trained (it did not, before the fix)


def _initial_weights(hf_dir: str) -> dict:
    return run_gloo(_step_worker, 1, hf_dir, [dict(recompute="none", lr=1e-30)])[0][0][1]


def test_recompute_gives_the_same_step_at_tp2(hf_dir):
    _check(run_gloo(_step_worker, 2, hf_dir))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(recompute="selective", recompute_layers=2), "recompute_layers = 2 applies only with"),
        (dict(offload_activations=True, recompute="full"), "exclude each other"),
        (dict(offload_activations=True, pipeline_parallel=2), "pipeline_parallel > 1"),
    ],
)
def test_contradicting_settings_are_refused(setting, message):
    from lcot_mega.actor.megatron_adapter import actor_config_errors

    errors = actor_config_errors(ActorConfig(**setting))
    assert any(message in e for e in errors), errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without Transformer Engine")
def test_activation_offload_is_refused_without_transformer_engine():
    from lcot_mega.actor.megatron_adapter import setup_errors

    errors = setup_errors(ActorConfig(offload_activations=True), world_size=1)
    assert any("offload_activations needs Transformer Engine" in e for e in errors), errors
    assert setup_errors(ActorConfig(recompute="full"), world_size=1) == []


def test_the_recompute_keys_map_onto_megatron_cores_fields():
    from lcot_mega.actor.megatron_adapter import recompute_kwargs
    from lcot_mega.bridge.arch import ArchSpec

    arch = ArchSpec.__new__(ArchSpec)
    object.__setattr__(arch, "num_layers", 30)
    assert recompute_kwargs(ActorConfig(), arch) == {}
    assert recompute_kwargs(ActorConfig(recompute="full", recompute_layers=3), arch) == dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3
    )
    assert recompute_kwargs(ActorConfig(recompute="selective"), arch) == dict(
        recompute_granularity="selective", recompute_modules=["core_attn"]
    )
    offload = recompute_kwargs(ActorConfig(offload_activations=True), arch)
    assert offload["cpu_offloading"] and offload["cpu_offloading_num_layers"] == 29
