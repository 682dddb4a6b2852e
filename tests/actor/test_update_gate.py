"""The update gate of `train_step`: a NaN gradient or bounds that reject the step's metrics leave the weights, Adam's
moments and step count and the LR schedule bit for bit as they were, on every rank and layout; without bounds (or
with bounds that pass) a step is bitwise megatron-core's own `ChainedOptimizer.step()`. Also the two levers the
guards pull: `set_lr_scale` (rollback) and `sharpen` (the entropy-collapse drill).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import VOCAB, make_tiny_hf
from helpers.train_batches import random_train_batch

from lcot_mega.actor.train_step import TrainBatch
from lcot_mega.config import ActorConfig, AlgoConfig
from lcot_mega.guards.bounds import UpdateBounds
from lcot_mega.trainer.faults import nan_gradients, set_nan_gradients, sharpen

pytest.importorskip("megatron.core")

# eps 1e-4: Adam's first steps stay smooth in the gradient (see test_train_step)
OPTIM = dict(lr=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-4, grad_clip=1.0, micro_batch_tokens=24)
SHARPEN = 30.0


class RejectOnRank:
    """Bounds that only one rank objects to: the gate must still skip on every rank (a rank stepping alone would
    hang in the parameter all-gather)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def rejects(self, metrics: dict[str, float]) -> list[str]:
        return ["this rank says no"] if torch.distributed.get_rank() == self.rank else []


ENTROPY_MAX = math.log(VOCAB) + 1e-3
REJECT_NORM = UpdateBounds({"actor/grad_norm": (None, 1e-6)})  # every real gradient is larger
PASS = UpdateBounds({"actor/grad_norm": (0.0, 1e9), "actor/entropy": (0.0, ENTROPY_MAX)}, reject_nonfinite=True)
ENTROPY_ONLY = UpdateBounds({"actor/entropy": (0.0, ENTROPY_MAX)})
"""Passes a NaN-loss step (its forward, hence its entropy, is finite): the NaN gradient norm alone must skip it."""


def _actor(hf_dir: str, **cfg):
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config

    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    return MegatronActor(arch, ActorConfig(**(OPTIM | cfg)), AlgoConfig(), hf_dir)


def _state(actor) -> dict[str, torch.Tensor]:
    """Copies of every weight, every Adam state tensor (moments and step) and the schedule position."""
    out = {f"w/{n}": p.detach().clone() for c in actor.chunks for n, p in c.module.named_parameters()}
    for i, opt in enumerate(actor.optimizer.chained_optimizers):
        for j, group in enumerate(opt.optimizer.param_groups):
            for k, p in enumerate(group["params"]):
                for key, v in opt.optimizer.state.get(p, {}).items():
                    out[f"adam/{i}/{j}/{k}/{key}"] = torch.as_tensor(v).clone()
    out["lr"] = torch.tensor([g["lr"] for g in actor.optimizer.param_groups], dtype=torch.float64)
    out["schedule_steps"] = torch.tensor(actor.scheduler.num_steps)
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _adam_steps(state: dict[str, torch.Tensor]) -> set[float]:
    return {float(v) for k, v in state.items() if k.endswith("/step")}


def _megatron_core_step(actor, batch: TrainBatch) -> float:
    """train_step as it was before the gate (world size 1): the schedule, then megatron-core's own
    `ChainedOptimizer.step()`. Returns its grad norm."""
    from lcot_mega.actor import train_step as ts

    micro_batches = ts.micro_batches_for_this_rank(batch.sequences, actor.cfg.micro_batch_tokens)
    denominator = ts.global_denominator(micro_batches, actor.algo)
    head = ts.TokenStatsHead(actor.chunks, actor.arch.vocab_size, actor.cfg.logits_chunk_tokens)
    loss_fn = ts._MicroBatchLoss(batch, actor.algo, head, denominator, len(micro_batches))
    for chunk in actor.chunks:
        chunk.zero_grad_buffer()
    actor.optimizer.zero_grad()
    ts.run_schedule(actor.chunks, micro_batches, loss_fn, forward_only=False, head=head)
    actor.scheduler.step(increment=1)
    ok, grad_norm, _ = actor.optimizer.step()
    assert ok
    return float(grad_norm)


# ------------------------------------------------------------------------------------------ one process


def _one_rank_gate(rank: int, world: int, hf_dir: str) -> dict:
    torch.set_num_threads(1)  # tiny matrices: more threads only oversubscribe the cores
    out = {}
    gated = _actor(hf_dir)
    out["m1"] = gated.train_step(random_train_batch(1))
    out["s1"] = _state(gated)
    with nan_gradients(gated):
        out["m_nan"] = gated.train_step(random_train_batch(2))
    out["s_nan"] = _state(gated)
    with nan_gradients(gated):
        out["m_nan_bounded"] = gated.train_step(random_train_batch(2, update_bounds=ENTROPY_ONLY))
    out["s_nan_bounded"] = _state(gated)
    out["m_rej"] = gated.train_step(random_train_batch(2, update_bounds=REJECT_NORM))
    out["s_rej"] = _state(gated)
    out["m_pass"] = gated.train_step(random_train_batch(2, update_bounds=PASS))
    out["s_pass"] = _state(gated)

    plain = _actor(hf_dir)
    out["plain"] = [plain.train_step(random_train_batch(1)), plain.train_step(random_train_batch(2))]
    out["s_plain"] = _state(plain)

    core = _actor(hf_dir)
    out["core_norms"] = [
        _megatron_core_step(core, random_train_batch(1)),
        _megatron_core_step(core, random_train_batch(2)),
    ]
    out["s_core"] = _state(core)
    return out


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict:
    hf_dir = str(make_tiny_hf(tmp_path_factory.mktemp("tiny"), "qwen2"))
    (out,) = run_gloo(_one_rank_gate, 1, hf_dir)
    return out


def test_nan_gradients_skip_the_update_and_leave_weights_adam_and_schedule_untouched(one_rank):
    m = one_rank["m_nan"]
    assert math.isnan(m["actor/grad_norm"]) and math.isfinite(m["actor/loss"])  # the gate reads the gradients
    assert (m["actor/update_ok"], m["actor/gate_skipped"]) == (0.0, 1.0)
    assert m["actor/lr"] == one_rank["m1"]["actor/lr"] == OPTIM["lr"]
    assert _same(one_rank["s_nan"], one_rank["s1"])
    assert _adam_steps(one_rank["s_nan"]) == {1.0}  # the one update before it, on every parameter
    # bounds that the NaN step's metrics pass do not let its NaN gradient through either
    assert ENTROPY_ONLY.rejects(one_rank["m_nan_bounded"]) == []
    assert one_rank["m_nan_bounded"]["actor/gate_skipped"] == 1.0
    assert _same(one_rank["s_nan_bounded"], one_rank["s1"])


def test_bounds_below_the_grad_norm_skip_the_update(one_rank):
    m = one_rank["m_rej"]
    assert m["actor/grad_norm"] > 1e-6 and math.isfinite(m["actor/loss"])
    assert (m["actor/update_ok"], m["actor/gate_skipped"]) == (0.0, 1.0)
    assert _same(one_rank["s_rej"], one_rank["s1"])
    # the metrics are the step's own: the same norm the ungated run saw for this batch
    assert m["actor/grad_norm"] == one_rank["plain"][1]["actor/grad_norm"]


def test_after_skipped_steps_a_passing_step_equals_the_uninterrupted_run_bitwise(one_rank):
    m, want = one_rank["m_pass"], one_rank["plain"][1]
    assert (m["actor/update_ok"], m["actor/gate_skipped"]) == (1.0, 0.0)
    assert m == want
    assert _same(one_rank["s_pass"], one_rank["s_plain"])
    assert _adam_steps(one_rank["s_pass"]) == {2.0}
    assert not _same(one_rank["s_pass"], one_rank["s1"])


def test_an_ungated_step_is_megatron_cores_own_optimizer_step_bitwise(one_rank):
    assert [m["actor/grad_norm"] for m in one_rank["plain"]] == one_rank["core_norms"]
    assert _same(one_rank["s_plain"], one_rank["s_core"])


# ------------------------------------------------------------------------------------------ two processes


def _two_rank_gate(rank: int, world: int, hf_dir: str, layouts: list) -> dict:
    from lcot_mega.actor import megatron_adapter as ma

    torch.set_num_threads(1)
    out = {}
    for name, tp, pp in layouts:
        actor = _actor(hf_dir, tensor_parallel=tp, pipeline_parallel=pp)
        actor.train_step(random_train_batch(1))
        before = _state(actor)
        metrics, unchanged = [], []
        for bounds, nan in ((REJECT_NORM, False), (None, True), (RejectOnRank(1), False), (RejectOnRank(0), False)):
            set_nan_gradients(actor, nan)
            metrics.append(actor.train_step(random_train_batch(2, update_bounds=bounds)))
            set_nan_gradients(actor, False)
            unchanged.append(_same(_state(actor), before))
        metrics.append(actor.train_step(random_train_batch(2, update_bounds=PASS)))
        unchanged.append(_same(_state(actor), before))
        sequences = random_train_batch(3).sequences
        cold = actor.compute_logprobs_and_entropy(sequences, temperature=1 / SHARPEN)
        sharpen(actor, SHARPEN)
        sharp = actor.compute_logprobs_and_entropy(sequences, temperature=1.0)
        out[name] = dict(metrics=metrics, unchanged=unchanged, cold=cold, sharp=sharp)
        ma.destroy_parallel()
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    hf_dir = str(make_tiny_hf(tmp_path_factory.mktemp("tied"), "qwen3", tie=True))  # tied: only the norm sharpens
    return run_gloo(_two_rank_gate, 2, hf_dir, [("tp2", 2, 1), ("dp2", 1, 1), ("pp2", 1, 2)])


def test_the_gate_decides_the_same_on_every_rank_at_tp2_dp2_pp2(two_ranks):
    for rank, results in enumerate(two_ranks):
        for name, r in results.items():
            where = (rank, name)
            # REJECT_NORM, NaN gradients, rank 1 objects, rank 0 objects: skipped, bit for bit; then PASS: applied
            assert [m["actor/gate_skipped"] for m in r["metrics"]] == [1.0, 1.0, 1.0, 1.0, 0.0], where
            assert [m["actor/update_ok"] for m in r["metrics"]] == [0.0, 0.0, 0.0, 0.0, 1.0], where
            assert r["unchanged"] == [True, True, True, True, False], where
            assert r["metrics"][0] == two_ranks[0][name]["metrics"][0], where
            assert r["metrics"][-1] == two_ranks[0][name]["metrics"][-1], where


def test_sharpen_scales_the_logits_on_every_rank_at_tp2_dp2_pp2(two_ranks):
    """Hand-worked: the final norm's weight times s scales the logits by s (the output layer is linear, without
    bias), so the sharpened policy at temperature 1 is the old one at temperature 1 / s. At DP=2 each replica
    scores half of the sequences, at PP=2 only the last stage holds the norm."""
    for rank, results in enumerate(two_ranks):
        for name, r in results.items():
            for field in ("logprobs", "entropy"):
                for got, want in zip(getattr(r["sharp"], field), getattr(r["cold"], field), strict=True):
                    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (rank, name, field)


# ------------------------------------------------------------------------------------------ LR scale


def _lr_scale_run(rank: int, world: int, hf_dir: str, ckpt: str) -> dict:
    torch.set_num_threads(1)
    schedule = dict(warmup_steps=2, lr_schedule="linear", lr_decay_steps=6, min_lr=2e-4)
    out = {}
    full = _actor(hf_dir, **schedule)
    half = _actor(hf_dir, **schedule)
    out["full"] = [full.train_step(random_train_batch(1))["actor/lr"]]
    half.train_step(random_train_batch(1))
    w1 = _state(half)
    half.set_lr_scale(0.5)
    half.set_lr_scale(0.5)  # absolute: twice is once
    out["current_lr"] = half.optimizer.param_groups[0]["lr"]
    out["full"].append(full.train_step(random_train_batch(2))["actor/lr"])
    out["half"] = [half.train_step(random_train_batch(2))["actor/lr"]]
    out["moves"] = _moves(w1, _state(full)), _moves(w1, _state(half))
    out["full"].append(full.train_step(random_train_batch(3))["actor/lr"])
    out["half"].append(half.train_step(random_train_batch(3))["actor/lr"])
    half.save_checkpoint(ckpt, 3)  # saved at scale 0.5

    resumed = {}
    for scale in (None, 0.5, 0.25):
        actor = _actor(hf_dir, **schedule)
        if scale == 0.25:
            actor.set_lr_scale(scale)  # before the load: the load keeps the actor's scale
        actor.load_checkpoint(ckpt)
        if scale == 0.5:
            actor.set_lr_scale(scale)
        resumed[scale] = actor.train_step(random_train_batch(4))["actor/lr"]
    out["full"].append(full.train_step(random_train_batch(4))["actor/lr"])
    out["resumed"] = resumed
    return out


def _moves(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: after[k] - before[k] for k in before if k.startswith("w/")}


def test_lr_scale_halves_the_next_updates_and_survives_a_checkpoint(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path / "m", "llama"))
    (out,) = run_gloo(_lr_scale_run, 1, hf_dir, str(tmp_path / "ckpt"))
    # warmup over 2 updates from 0, then linear decay from 1e-3 to 2e-4 at update 6: 0.5, 1, 0.8, 0.6 (x 1e-3)
    assert out["full"] == pytest.approx([5e-4, 1e-3, 8e-4, 6e-4], rel=1e-12)
    assert out["current_lr"] == pytest.approx(0.5 * 5e-4, rel=1e-12)  # the LR of update 1, rescaled at once
    assert out["half"] == pytest.approx([5e-4, 4e-4], rel=1e-12)
    # Adam's update is linear in the LR (same state, same gradient): half the LR moves every weight half as far
    full_moves, half_moves = out["moves"]
    assert max(m.abs().max().item() for m in full_moves.values()) > 1e-4
    for name, move in full_moves.items():
        assert torch.allclose(half_moves[name], 0.5 * move, rtol=1e-3, atol=5e-7), name
    # a fresh actor (scale 1) runs the configured schedule from the checkpoint, whatever scale it was saved at;
    # set_lr_scale after the load, or before it, gives the scaled one
    assert out["resumed"] == pytest.approx({None: 6e-4, 0.5: 3e-4, 0.25: 1.5e-4}, rel=1e-12)


def test_lr_scale_must_be_positive_and_finite():
    from lcot_mega.actor.actor import MegatronActor

    actor = object.__new__(MegatronActor)  # the check comes before any state is touched
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="LR scale must be finite and > 0"):
            actor.set_lr_scale(bad)


# ------------------------------------------------------------------------------------------ sharpen


def _sharpen_run(rank: int, world: int, hf_dir: str) -> dict:
    torch.set_num_threads(1)
    actor = _actor(hf_dir)
    sequences = random_train_batch(1).sequences
    weight = actor.chunks[0].module.decoder.final_layernorm.weight
    w0 = weight.detach().clone()
    before = actor.compute_logprobs_and_entropy(sequences)
    sharpen(actor, SHARPEN)
    w_sharp = weight.detach().clone()
    after = actor.compute_logprobs_and_entropy(sequences)
    actor.train_step(random_train_batch(2))  # the optimizer's copy of the weight was sharpened too: a step keeps it
    return dict(before=before, after=after, w0=w0, w_sharp=w_sharp, w_stepped=weight.detach().clone())


def test_sharpen_collapses_the_entropy(tmp_path):
    hf_dir = str(make_tiny_hf(tmp_path, "llama"))  # near-uniform: mean entropy 4.55 of at most log(96) = 4.56
    (out,) = run_gloo(_sharpen_run, 1, hf_dir)
    assert torch.equal(out["w_sharp"], out["w0"] * SHARPEN)
    mean_before = torch.cat(out["before"].entropy).mean().item()
    mean_after = torch.cat(out["after"].entropy).mean().item()
    assert mean_after < mean_before / 5, (mean_before, mean_after)
    # one Adam step of lr 1e-3 moves each weight by at most about 1e-3, from the sharpened weight (about 30)
    assert 1e-5 < (out["w_stepped"] - out["w_sharp"]).abs().max().item() < 2e-3
