"""Qwen3-MoE on the Megatron actor (issue 21, first slice): a tiny random `Qwen3MoeForCausalLM` loads into
megatron-core MoE layers at expert parallelism 1 and 2 (over gloo, on CPU) and gives transformers' log-probs; at
EP1 it exports back bit-exact; what is not built yet is refused with a reason."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import ONE_ROUTING_BY_DEFAULT, make_tiny_hf, response_logprobs

pytest.importorskip("megatron.core")

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, initializer_range=0.2)
SEQUENCES = [([1, 5, 9, 13], [20, 30, 40, 50, 60]), ([2, 6, 10], [70, 80, 11, 12]), ([7], [3, 4, 5, 6, 8, 9])]


def _actor_run(rank: int, world: int, hf_dir: str, ep: int) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.bridge.hf_export import iter_hf_tensors
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    actor = MegatronActor(arch, ActorConfig(expert_parallel=ep, lr=1e-2), AlgoConfig(), hf_dir)
    experts = [list(layer.mlp.local_expert_indices) for layer in actor.chunks[0].module.decoder.layers]
    out = {"logprobs": actor.compute_logprobs(SEQUENCES), "experts": experts}
    exported = dict(iter_hf_tensors(actor.chunks, arch))  # at EP2: each rank's experts gathered from the other
    saved = load_file(f"{hf_dir}/model.safetensors")
    out["export"] = sorted(exported) == sorted(saved) and all(torch.equal(exported[n], saved[n]) for n in saved)
    batch = TrainBatch([p for p, _ in SEQUENCES], [r for _, r in SEQUENCES], advantages=[1.0, -1.0, 0.5])
    out["metrics"] = actor.train_step(batch)
    out["after"] = actor.compute_logprobs(SEQUENCES)
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "no_norm_topk"])
def moe_dir(request, tmp_path_factory):
    return str(make_tiny_hf(tmp_path_factory.mktemp("moe"), "qwen3_moe", norm_topk_prob=request.param, **MOE))


def _reference(hf_dir: str) -> list[torch.Tensor]:
    return response_logprobs(hf_dir, SEQUENCES)


@pytest.mark.parametrize("ep", [1, 2])
def test_moe_actor_gives_transformers_logprobs(moe_dir, ep):
    results = run_gloo(_actor_run, ep, moe_dir, ep)
    want = _reference(moe_dir)
    assert results[0]["experts"] == ([[0, 1, 2, 3]] * 4 if ep == 1 else [[0, 1]] * 4)
    if ep == 2:
        assert results[1]["experts"] == [[2, 3]] * 4  # each rank holds its half of every layer's experts
    for out in results:
        for got, ref in zip(out["logprobs"], want, strict=True):
            assert torch.allclose(got.double(), ref, atol=1e-4), (got.double() - ref).abs().max()
    assert all(out["export"] is True for out in results)  # every HF tensor back, bit for bit, on every rank


@ONE_ROUTING_BY_DEFAULT
def test_one_adam_step_is_the_same_at_ep1_ep2_and_on_one_rank(moe_dir):
    """One rank; two data-parallel ranks with every expert on each (EP1); two ranks with half the experts each
    (EP2): the same batch and step give the same updated model (expert gradients reduced and scaled right)."""
    (single,) = run_gloo(_actor_run, 1, moe_dir, 1)
    for ep in (1, 2):
        for out in run_gloo(_actor_run, 2, moe_dir, ep):
            assert out["metrics"]["actor/update_ok"] == 1.0
            for got, ref in zip(out["after"], single["after"], strict=True):
                assert torch.allclose(got, ref, atol=2e-5), (ep, (got - ref).abs().max())
    moved = max((a - b).abs().max() for a, b in zip(single["after"], single["logprobs"], strict=True))
    assert moved > 1e-2  # the step changed the model: equality above is not of two untouched models


def test_routing_differs_between_the_two_normalizations(moe_dir, tmp_path):
    """The two routings give different log-probs: a mapping that ignored norm_topk_prob would fail one variant."""
    from transformers import AutoConfig

    flipped = not AutoConfig.from_pretrained(moe_dir).norm_topk_prob
    other = str(make_tiny_hf(tmp_path / "other", "qwen3_moe", norm_topk_prob=flipped, **MOE))
    assert max((a - b).abs().max() for a, b in zip(_reference(moe_dir), _reference(other), strict=True)) > 1e-3


def test_unsupported_moe_layouts_are_refused_with_a_reason(tmp_path):
    from transformers import AutoConfig

    from lcot_mega.bridge.arch import UnsupportedModelError, arch_from_hf_config

    cfg = AutoConfig.for_model("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2, **MOE)
    with pytest.raises(UnsupportedModelError, match=r"sparse layers \[1, 3\]"):
        arch_from_hf_config(cfg)


def _dense_with_experts(rank: int, world: int, hf_dir: str) -> str:
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.megatron_adapter import ActorSetupError
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    try:
        MegatronActor(arch, ActorConfig(expert_parallel=2), AlgoConfig(), hf_dir)
    except ActorSetupError as e:
        return str(e)
    return "no error"


def test_expert_parallel_on_a_dense_model_is_refused(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path, "qwen3"))
    assert all("needs a mixture-of-experts model" in m for m in run_gloo(_dense_with_experts, 2, hf_dir))


def _sync_run(rank: int, world: int, actor_dir: str, engine_dir: str, ep: int = 1) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig
    from lcot_mega.rollout import EmbeddedEngine
    from lcot_mega.weight_sync import ProbeCheck, sync_weights
    from lcot_mega.weight_sync.push import fixed_probe_ids

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(actor_dir))
    actor = MegatronActor(arch, ActorConfig(expert_parallel=ep), AlgoConfig(), actor_dir)
    engine = EmbeddedEngine(engine_dir)  # rank 0's is synced (the owner); the others' stand by
    probe = ProbeCheck(fixed_probe_ids(arch.vocab_size), 1e-4)
    before = [engine.score(p, r) for p, r in SEQUENCES]
    report = sync_weights(actor.chunks, arch, [engine], 1, verify=probe)
    if rank == 0:
        engine.release_memory(["weights"])
        engine.resume_memory(["weights"])
    again = sync_weights(actor.chunks, arch, [engine], 2, verify=probe)  # every expert again, by checkpoint name
    return dict(
        before=before,
        after=[engine.score(p, r) for p, r in SEQUENCES] if rank == 0 else None,
        actor=actor.compute_logprobs(SEQUENCES),
        probes=(report.probe_max_diff, again.probe_max_diff),
    )


@pytest.mark.parametrize("ep", [1, 2])
def test_weight_sync_into_the_embedded_engine_by_checkpoint_names(tmp_path, ep):
    """transformers holds the experts fused ([E, 2I, H]); the sync sends them per expert, as checkpoints and SGLang
    name them, into views of the fused parameters, also after the engine released and resumed its weights. At EP2
    the owner gathers the other rank's experts."""
    shape = dict(MOE, moe_intermediate_size=24, norm_topk_prob=True)  # 2I != H: a transposed view cannot pass
    actor_dir = str(make_tiny_hf(tmp_path / "a", "qwen3_moe", seed=0, **shape))
    engine_dir = str(make_tiny_hf(tmp_path / "b", "qwen3_moe", seed=1, **shape))
    out = run_gloo(_sync_run, ep, actor_dir, engine_dir, ep)[0]
    assert max((b - a).abs().max() for b, a in zip(out["before"], out["actor"], strict=True)) > 0.1
    assert all(p is not None and p < 1e-5 for p in out["probes"])
    for got, want in zip(out["after"], out["actor"], strict=True):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_the_tiny_recipe_trains_a_moe_model_end_to_end(tmp_path):
    """`lcot-mega train` on the tiny Qwen3-MoE: samples, grades, trains, syncs (probe checked) and evaluates."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from lcot_mega.utils.tiny_model import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "moe", "qwen3_moe")
    config = Path(__file__).parents[2] / "configs" / "tiny_cpu.yaml"
    cmd = [sys.executable, "-m", "lcot_mega.cli", "train", str(config), f"model.path={model}", "trainer.steps=2"]
    res = subprocess.run([*cmd, "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "actor/update_ok" in r]
    assert len(trained) == 2 and all(r["actor/update_ok"] == 1.0 for r in trained)
    assert all(r["sync/probe_max_diff"] < 1e-4 and r["rollout/logp_gap_max"] < 1e-4 for r in trained)


def _step_save_step(rank: int, world: int, hf_dir: str, ckpt: str, ep: int, load: bool) -> list[torch.Tensor]:
    """One Adam step then a save (or, with `load`, the saved checkpoint restored instead), then a second step."""
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    actor = MegatronActor(arch, ActorConfig(expert_parallel=ep, lr=1e-2), AlgoConfig(), hf_dir)
    batch = TrainBatch([p for p, _ in SEQUENCES], [r for _, r in SEQUENCES], advantages=[1.0, -1.0, 0.5])
    if load:
        actor.load_checkpoint(ckpt)
    else:
        actor.train_step(batch)
        actor.save_checkpoint(ckpt, 1)
    actor.train_step(batch)
    return actor.compute_logprobs(SEQUENCES)


@ONE_ROUTING_BY_DEFAULT
def test_a_checkpoint_saved_at_ep2_resumes_at_ep1(moe_dir, tmp_path):
    """Model and Adam state saved with half the experts on each of two ranks load into one rank holding all of them
    (dist-checkpointing reshards the experts), and the next step equals the uninterrupted EP2 run's."""
    ckpt = str(tmp_path / "ckpt")
    uninterrupted = run_gloo(_step_save_step, 2, moe_dir, ckpt, 2, False)
    (resumed,) = run_gloo(_step_save_step, 1, moe_dir, ckpt, 1, True)
    for got, want in zip(resumed, uninterrupted[0], strict=True):
        assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()


def _train(tmp_path, name: str, *overrides: str) -> list[dict]:
    import json
    import subprocess
    import sys
    from pathlib import Path

    from lcot_mega.utils.tiny_model import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "moe", "qwen3_moe")
    config = Path(__file__).parents[2] / "configs" / "tiny_cpu.yaml"
    cmd = [sys.executable, "-m", "lcot_mega.cli", "train", str(config), f"model.path={model}", *overrides]
    res = subprocess.run([*cmd, "--run-dir", str(tmp_path / name)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "actor/update_ok" in r]


REPLAY = ("model.dtype=bfloat16", "trainer.steps=2", "trainer.eval_every=0", "actor.routing_replay=rollout")


def test_the_tiny_recipe_trains_a_moe_model_with_routing_replay(tmp_path):
    """A bf16 engine routes some tokens differently from the fp32 actor (mismatch > 0); the actor replays the
    engine's experts for nearly every token (all but each sequence's last) and the train-vs-rollout gap stays small."""
    steps = _train(tmp_path, "run", *REPLAY)
    assert len(steps) == 2 and all(r["actor/update_ok"] == 1.0 for r in steps)
    for r in steps:
        assert r["moe/replayed_fraction"] > 0.9 and 0 < r["moe/replay_mismatch"] < 0.05
        assert r["rollout/logp_gap_max"] < 0.2
        assert 1.0 <= r["moe/expert_load_max"] <= 2.0 and 0 < r["moe/router_entropy"] < r["moe/router_entropy_max"]


@pytest.mark.slow
def test_routing_replay_trains_the_same_disaggregated_at_ep2_as_locally(tmp_path):
    """Ray engine actors and two actor ranks holding half the experts each (weights synced across EP): the same
    samples, replayed routing and metrics as one process."""
    local = _train(tmp_path, "local", *REPLAY)
    disaggregated = _train(
        tmp_path, "disagg", *REPLAY, "cluster.mode=disaggregated", "cluster.actor_ranks=2", "actor.expert_parallel=2"
    )
    for a, b in zip(local, disaggregated, strict=True):
        for key in ("moe/replayed_fraction", "moe/replay_mismatch", "moe/expert_load_max", "rollout/logp_gap_max"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_routing_replay_settings_that_cannot_work_are_refused(tmp_path):
    from lcot_mega.actor.megatron_adapter import setup_errors
    from lcot_mega.config import ActorConfig, Config
    from lcot_mega.config.schema import cross_field_errors

    layouts = [dict(recompute="full", context_parallel=2), dict(tensor_parallel=2, sequence_parallel=True)]
    for layout in layouts:  # all built (tests/actor/test_routing_replay.py)
        assert setup_errors(ActorConfig(routing_replay="rollout", **layout), 2) == []
    cfg = Config()
    cfg.actor.routing_replay, cfg.rollout.engine = "rollout", "vllm"
    assert any("routed experts (embedded, sglang), not vllm" in e for e in cross_field_errors(cfg))
    hf_dir = str(make_tiny_hf(tmp_path, "qwen3"))
    assert "needs a mixture-of-experts model" in run_gloo(_dense_with_replay, 1, hf_dir)[0]


def _dense_with_replay(rank: int, world: int, hf_dir: str) -> str:
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.megatron_adapter import ActorSetupError
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    try:
        MegatronActor(arch, ActorConfig(routing_replay="rollout"), AlgoConfig(), hf_dir)
    except ActorSetupError as e:
        return str(e)
    return "no error"


def _router_step(rank: int, world: int, hf_dir: str, aux: float, z: float) -> dict:
    """One step with zero advantages (the policy loss has no gradient): only the aux / z losses move the routers."""
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    cfg = ActorConfig(pack_sequences=True, lr=1e-3, moe_aux_loss_coeff=aux, moe_z_loss_coeff=z)
    actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
    layers = actor.chunks[0].module.decoder.layers
    before = [layer.mlp.router.weight.detach().clone() for layer in layers]
    metrics = actor.train_step(TrainBatch([p for p, _ in SEQUENCES], [r for _, r in SEQUENCES], [0.0, 0.0, 0.0]))
    moved = [layer.mlp.router.weight.detach() - b for layer, b in zip(layers, before, strict=True)]
    return {"metrics": metrics, "moved": moved}


def _router_reference(hf_dir: str) -> tuple[list[torch.Tensor], float, float]:
    """transformers over the same tokens: d(z-loss)/dW of every router (a later layer's z-loss reaches the earlier
    routers through the hidden states), and the z and Switch load-balancing losses without coefficients, means over
    layers: ST-MoE's mean_t logsumexp^2, and E * sum_i f_i P_i with f_i = tokens routed to i / (T k), P_i = mean
    router probability of i."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    logits: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    for j, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, out, j=j: logits[j].append(out[0]))
    for prompt, response in SEQUENCES:
        model(torch.tensor([prompt + response]))
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    per_layer = [torch.cat(chunks) for chunks in logits]  # [T, E] each
    z_losses = [torch.logsumexp(x, -1).square().mean() for x in per_layer]
    sum(z_losses).backward()
    aux_losses = []
    for x in per_layer:
        probs = torch.softmax(x.detach(), -1)
        f = torch.bincount(probs.topk(k, -1).indices.reshape(-1), minlength=experts) / (x.shape[0] * k)
        aux_losses.append(float(experts * (f * probs.mean(0)).sum()))
    grads = [layer.mlp.gate.weight.grad for layer in model.model.layers]
    return grads, float(sum(z_losses)) / len(z_losses), sum(aux_losses) / len(aux_losses)


@ONE_ROUTING_BY_DEFAULT
def test_router_z_loss_and_aux_loss_act_and_are_reported(moe_dir):
    grads, z_ref, aux_ref = _router_reference(moe_dir)
    (z_only,) = run_gloo(_router_step, 1, moe_dir, 0.0, 1e-2)
    assert z_only["metrics"]["moe/z_loss"] == pytest.approx(z_ref, rel=1e-4)
    for moved, grad in zip(z_only["moved"], grads, strict=True):
        clear = grad.abs() > 1e-6  # Adam's first step moves each weight by lr against its gradient's sign
        assert clear.float().mean() > 0.9
        assert torch.equal(torch.sign(moved[clear]), -torch.sign(grad[clear]))
    (aux_only,) = run_gloo(_router_step, 1, moe_dir, 1e-2, 0.0)
    assert aux_only["metrics"]["moe/aux_loss"] == pytest.approx(aux_ref, rel=1e-4)
    assert "moe/z_loss" not in aux_only["metrics"]
    assert all(m.abs().max() > 1e-4 for m in aux_only["moved"])
    (neither,) = run_gloo(_router_step, 1, moe_dir, 0.0, 0.0)
    assert all(m.abs().max() == 0 for m in neither["moved"])  # the two tests above cannot pass by chance


def test_qwen2_moe_with_a_gated_shared_expert(tmp_path):
    """Qwen2-MoE: every token also goes through a shared expert scaled by a sigmoid gate (megatron-core's
    SharedExpertMLP with its gate). Log-probs equal transformers' at EP1 and EP2, the export is bit-exact at both,
    and one Adam step gives the same model at EP1 and EP2."""
    from transformers import AutoModelForCausalLM

    from lcot_mega.utils.tiny_model import TINY_SHARED_EXPERT

    hf_dir = str(make_tiny_hf(tmp_path, "qwen2_moe", initializer_range=0.2, **TINY_SHARED_EXPERT))
    want = _reference(hf_dir)
    (ep1,) = run_gloo(_actor_run, 1, hf_dir, 1)
    for out in [ep1, *run_gloo(_actor_run, 2, hf_dir, 2)]:
        assert out["export"] is True
        for got, ref in zip(out["logprobs"], want, strict=True):
            assert torch.allclose(got.double(), ref, atol=1e-4), (got.double() - ref).abs().max()
        for got, ref in zip(out["after"], ep1["after"], strict=True):
            assert torch.allclose(got, ref, atol=2e-5), (got - ref).abs().max()
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    for layer in model.model.layers:  # the same model with the shared expert silenced
        layer.mlp.shared_expert.down_proj.weight.data.zero_()
    model.save_pretrained(tmp_path / "silenced")
    silenced = _reference(str(tmp_path / "silenced"))
    assert max((a - b).abs().max() for a, b in zip(silenced, want, strict=True)) > 1e-3  # it matters
