"""One policy step gives the same gradient in every layout and micro-batching, equal to the gradient of the
same loss on a plain transformers model (an independent reference), and Adam then moves the Megatron weights
exactly as torch.optim.Adam moves the transformers weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tensor_helpers import one_thread
from helpers.tiny_models import FAMILIES, make_tiny_hf

from lcot_mega.actor.batching import plan_micro_batches
from lcot_mega.actor.mini_batches import PER_SEQUENCE_FIELDS
from lcot_mega.actor.train_step import TrainBatch
from lcot_mega.algo import aggregate, aggregation_denominator, kl_penalty, policy_loss
from lcot_mega.bridge.arch import arch_from_hf_config
from lcot_mega.config import ActorConfig, AlgoConfig

pytest.importorskip("megatron.core")


TEMPERATURE = 0.7
ADAM = dict(lr=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-4, grad_clip=1.0, weight_decay=0.0)
# eps 1e-4 keeps the first Adam steps smooth in the gradient (lr * g / (|g| + eps)): with eps 1e-8 a gradient
# entry near 0 becomes lr * sign(g), and float noise in g would decide a 2 * lr difference


CHUNK5, FULL = dict(logits_chunk_tokens=5), dict(logits_chunk_tokens=0)
PACKED = dict(logits_chunk_tokens=5, pack_sequences=True)
"""Extra actor settings of a layout: chunked log-probs (several chunks per micro-batch), the full logits, packing."""


@dataclass
class Case:
    """One train_step configuration; `budget` is actor.micro_batch_tokens."""

    name: str
    budget: int
    algo: dict = field(default_factory=dict)
    steps: int = 1
    with_ref: bool = False  # pass ref log-probs; else computed by the actor (only with kl_coef > 0)
    per_token_adv: bool = False
    with_rollout: bool = False
    offline: tuple[int, ...] = ()  # sequences trained as injected offline solutions (policy-shaping loss)
    updates: int = 1  # actor.updates_per_batch: mini-batches of one step, each an Adam step
    own_old: bool = False  # no old log-probs given: the actor computes them at the start of each step

    def algo_config(self) -> AlgoConfig:
        from lcot_mega.config.schema import InjectionConfig, OffPolicyConfig

        algo = dict(self.algo)
        injection = InjectionConfig(**algo.pop("injection", {}))
        off_policy = OffPolicyConfig(**algo.pop("off_policy", {}))
        return AlgoConfig(**algo, injection=injection, off_policy=off_policy)


CASES = {
    # clipped PPO, token-mean, several micro-batches; two Adam steps compared weight by weight
    "ppo": Case("ppo", budget=24, steps=2),
    # the same loss in one micro-batch
    "ppo_1mb": Case("ppo_1mb", budget=4096),
    # every term: Dr.GRPO aggregation (counts rows), KL to given ref log-probs, entropy bonus, dual clip, TIS
    "terms": Case(
        "terms",
        budget=24,
        algo=dict(
            loss_agg="seq-mean-token-sum-norm",
            loss_max_len=16,
            kl_coef=0.1,
            kl_kind="low_var_kl",
            entropy_coef=0.2,
            dual_clip=3.0,
            is_cap=1.5,
            clip_high=0.28,
        ),
        with_ref=True,
        per_token_adv=True,
        with_rollout=True,
    ),
    # KL against the actor's own frozen reference, GRPO aggregation
    "own_ref": Case("own_ref", budget=24, algo=dict(kl_coef=0.2, loss_agg="seq-mean-token-mean")),
    # injected offline solutions beside sampled sequences: -A p / (p + gamma) on theirs, the clipped surrogate with
    # truncated IS on the others (their rollout log-probs are noise here: the IS weights must skip them), KL and
    # entropy on all, GRPO aggregation over one denominator
    "injected": Case(
        "injected",
        budget=24,
        algo=dict(
            loss_agg="seq-mean-token-mean",
            kl_coef=0.1,
            entropy_coef=0.2,
            is_cap=1.5,
            injection=dict(enabled=True, gamma=0.3),
        ),
        with_ref=True,
        with_rollout=True,
        offline=(1, 3, 6),
    ),
    # a sequence-level off-policy correction (masked IS on the product of a sequence's ratios): its sums must
    # follow sequences through chunking, packing and the pipeline; the cap masks some sequences and keeps others
    # PPO mini-batches: two Adam steps per batch, both clipped against the policy at the start of the step (whose
    # log-probs the actor computes), decoupled PPO's behaviour weight pi_prox / mu on top, capped by masking
    "minibatch": Case(
        "minibatch",
        budget=24,
        steps=2,
        algo=dict(off_policy=dict(correction="decoupled", high=1.3)),
        with_rollout=True,
        updates=2,
        own_old=True,
    ),
    "seq_mis": Case(
        "seq_mis",
        budget=24,
        algo=dict(off_policy=dict(correction="seq_mis", high=1.1)),
        with_rollout=True,
    ),
}


def _sequences() -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(1)
    # at 24 tokens per micro-batch: 4 micro-batches on one rank; at DP=2 the second rank runs an empty one
    shapes = [(3, 12), (1, 5), (7, 0), (2, 9), (5, 1), (4, 7), (6, 3), (1, 2)]
    return [
        (torch.randint(0, 96, (p,), generator=g).tolist(), torch.randint(0, 96, (r,), generator=g).tolist())
        for p, r in shapes
    ]


def _models(tmp_path) -> dict:
    from transformers import AutoConfig

    out = {}
    for f in FAMILIES:
        hf_dir = make_tiny_hf(tmp_path / f, f, tie=f == "qwen3")
        out[f] = (str(hf_dir), arch_from_hf_config(AutoConfig.from_pretrained(hf_dir)))
    return out


# ----------------------------------------------------------------------------- the transformers reference


def _hf_logprobs_entropy(model, sequences) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] log-probs and entropies of the response tokens under logits / T, and the mask (one sequence per
    forward, no padding anywhere)."""
    width = max(len(r) for _, r in sequences)
    logp = torch.zeros(len(sequences), width)
    ent = torch.zeros(len(sequences), width)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    rows_logp, rows_ent = [], []
    for prompt, response in sequences:
        z = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : len(prompt) + len(response) - 1]
        z = z / TEMPERATURE  # [R, V]
        rows_logp.append(z.log_softmax(-1).gather(-1, torch.tensor(response, dtype=torch.long)[:, None])[:, 0])
        rows_ent.append(torch.distributions.Categorical(logits=z).entropy())
    for i, (lp, en) in enumerate(zip(rows_logp, rows_ent, strict=True)):
        n = lp.numel()
        logp = logp.index_put((torch.full((n,), i), torch.arange(n)), lp)
        ent = ent.index_put((torch.full((n,), i), torch.arange(n)), en)
        mask[i, :n] = True
    return logp, ent, mask


def _padded(values: list, width: int) -> torch.Tensor:
    out = torch.zeros(len(values), width)
    for i, v in enumerate(values):
        v = torch.as_tensor(v, dtype=torch.float32)
        out[i, : v.numel() if v.dim() else width] = v
    return out


def _reference_weights(old, rollout, sampled, algo: AlgoConfig) -> torch.Tensor | None:
    """The off-policy weights written out: TIS min(rho, cap) per token; sequence masked IS rho_seq [rho_seq <= high]
    with rho_seq the product of the sequence's token ratios."""
    log_rho = torch.where(sampled, old - rollout, 0.0)  # [B, T]
    if algo.is_cap is not None:
        return torch.where(sampled, log_rho.exp().clamp_max(algo.is_cap), 0.0)
    if algo.off_policy.correction == "decoupled":
        rho = log_rho.exp()
        return torch.where(sampled & (rho <= algo.off_policy.high), rho, 0.0)
    if algo.off_policy.correction == "seq_mis":
        rho_seq = log_rho.sum(-1, keepdim=True).exp()  # [B, 1]
        kept = rho_seq <= algo.off_policy.high
        assert 0 < int(kept.sum()) < len(kept)  # the case masks some sequences and keeps others
        return torch.where(sampled & kept, rho_seq, 0.0)
    assert algo.off_policy.correction == "none"
    return None


def _reference_loss(model, batch: TrainBatch, algo: AlgoConfig) -> torch.Tensor:
    sequences = batch.sequences
    logp, ent, mask = _hf_logprobs_entropy(model, sequences)
    width = mask.shape[1]
    adv = _padded(batch.advantages, width)
    old = _padded(batch.old_logprobs, width)
    offline = torch.tensor(batch.offline or [False] * len(sequences))[:, None] & mask  # [B, T]
    sampled = mask & ~offline
    is_weights = None
    if batch.rollout_logprobs is not None:
        is_weights = _reference_weights(old, _padded(batch.rollout_logprobs, width), sampled, algo)
    agg = dict(agg=algo.loss_agg, max_len=algo.loss_max_len)
    den = aggregation_denominator(mask, algo.loss_agg, algo.loss_max_len)  # sampled and offline tokens together
    loss, _ = policy_loss(
        logp,
        old,
        adv,
        sampled,
        algo.clip_low,
        algo.clip_high,
        algo.dual_clip,
        is_weights=is_weights,
        denominator=den,
        agg=algo.loss_agg,
        max_len=algo.loss_max_len,
    )
    if offline.any():  # written out: -A p / (p + gamma), summed per sequence over its tokens (GRPO's token mean)
        shaped = -adv * logp.exp() / (logp.exp() + algo.injection.gamma)  # [B, T]
        assert algo.loss_agg == "seq-mean-token-mean"
        per_seq = torch.where(offline, shaped, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)  # [B]
        loss = loss + per_seq.sum() / den
    if algo.kl_coef > 0:
        ref = _padded(batch.ref_logprobs, width) if batch.ref_logprobs is not None else logp.detach()
        loss = loss + algo.kl_coef * aggregate(kl_penalty(logp, ref, algo.kl_kind, mask), mask, **agg)
    if algo.entropy_coef > 0:
        loss = loss - algo.entropy_coef * aggregate(ent, mask, **agg)
    return loss


def _make_batch(model, sequences, case: Case) -> TrainBatch:
    """Old log-probs off the current policy by noise, so some ratios leave the clip range."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        logp, _, mask = _hf_logprobs_entropy(model, sequences)
    lengths = mask.sum(-1).tolist()
    rows = [logp[i, :n] for i, n in enumerate(lengths)]

    def noisy(scale: float) -> list[torch.Tensor]:
        return [r + scale * torch.randn(r.shape, generator=g) for r in rows]

    adv = [float(a) for a in torch.randn(len(sequences), generator=g)]
    if case.per_token_adv:
        adv = [a + 0.5 * torch.randn(n, generator=g) for a, n in zip(adv, lengths, strict=True)]
    old = noisy(0.3)
    behaviour = old if not case.own_old else rows
    return TrainBatch(
        prompt_ids=[p for p, _ in sequences],
        response_ids=[r for _, r in sequences],
        advantages=adv,
        old_logprobs=None if case.own_old else old,
        ref_logprobs=noisy(0.3) if case.with_ref else None,
        rollout_logprobs=[o + 0.2 * torch.randn(o.shape, generator=g) for o in behaviour]
        if case.with_rollout
        else None,
        temperature=TEMPERATURE,
        offline=[i in case.offline for i in range(len(sequences))] if case.offline else None,
    )


def _part(values, lo: int, hi: int):
    return None if values is None else list(values[lo:hi])


def _reference_steps(hf_dir: str, batch: TrainBatch, case: Case, out_dir) -> list[float]:
    """Grad norms (before clipping) of `case.steps` torch.optim.Adam steps; the stepped model saved to `out_dir`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    adam = torch.optim.Adam(
        model.parameters(), lr=ADAM["lr"], betas=(ADAM["adam_beta1"], ADAM["adam_beta2"]), eps=ADAM["adam_eps"]
    )
    norms = []
    for _ in range(case.steps):
        step_batch, step_norms = batch, []
        if case.own_old:  # the policy at the start of the step, for every mini-batch of it
            with torch.no_grad():
                logp, _, mask = _hf_logprobs_entropy(model, batch.sequences)
            step_batch = replace(batch, old_logprobs=[logp[i, : int(n)] for i, n in enumerate(mask.sum(-1))])
        n = len(batch.sequences)
        for k in range(case.updates):  # consecutive mini-batches, sizes n * k // updates apart
            lo, hi = n * k // case.updates, n * (k + 1) // case.updates
            part = replace(step_batch, **{f: _part(getattr(step_batch, f), lo, hi) for f in PER_SEQUENCE_FIELDS})
            adam.zero_grad()
            _reference_loss(model, part, case.algo_config()).backward()
            step_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), ADAM["grad_clip"])))
            adam.step()
        norms.append(sum(step_norms) / len(step_norms))
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return norms


# ----------------------------------------------------------------------------- the Megatron side


def _param_diffs(actor, stepped_dir: str, initial_dir: str) -> tuple[float, float]:
    """(largest |w_actor - w_reference|, largest |w_actor - w_initial|) over every parameter; both loaded
    through the HF bridge. The second one shows the weights did move."""
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.hf_load import load_hf_weights

    worst = []
    for hf_dir in (stepped_dir, initial_dir):
        expected = ma.build_model(actor.arch, actor.cfg)
        load_hf_weights(expected, hf_dir, actor.arch, actor.layout.tp_rank, actor.layout.tp_size)
        diff = 0.0
        for got_chunk, want_chunk in zip(actor.chunks, expected, strict=True):
            want = dict(want_chunk.named_parameters())
            for name, p in got_chunk.module.named_parameters():
                diff = max(diff, (p.detach() - want[name].detach()).abs().max().item())
        worst.append(diff)
    return worst[0], worst[1]


def _train_worker(rank: int, world: int, models: dict, layouts: list, jobs: list) -> dict:
    """layouts: (name, tp, pp, vpp, extra actor settings); jobs: (family, case, batch, stepped_dir or None).

    Per (layout, family, case): the metrics of each step and `_param_diffs` (None without a stepped dir).
    """
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor

    torch.set_num_threads(1)  # tiny matrices: more threads only oversubscribe the cores (10x slower when busy)
    out = {}
    for name, tp, pp, vpp, extra in layouts:
        for family, case, batch, stepped_dir in jobs:
            hf_dir, arch = models[family]
            cfg = ActorConfig(
                tensor_parallel=tp,
                pipeline_parallel=pp,
                virtual_pipeline=vpp,
                micro_batch_tokens=case.budget,
                updates_per_batch=case.updates,
                **(ADAM | extra),
            )
            actor = MegatronActor(arch, cfg, case.algo_config(), hf_dir)
            metrics = [actor.train_step(batch) for _ in range(case.steps)]
            diffs = _param_diffs(actor, stepped_dir, hf_dir) if stepped_dir else None
            out[name, family, case.name] = (metrics, diffs)
        ma.destroy_parallel()
    return out


def _jobs_and_reference(tmp_path, models: dict, case_names: list[str]) -> tuple[list, dict]:
    from transformers import AutoModelForCausalLM

    sequences = _sequences()
    lengths = [len(p) + len(r) for p, r in sequences]
    assert [] in plan_micro_batches(lengths, 2, CASES["ppo"].budget)[1]  # DP=2 pads with an empty micro-batch
    jobs, expected = [], {}
    with one_thread():
        for family, (hf_dir, _) in models.items():
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
            for case_name in case_names:
                case = CASES[case_name]
                batch = _make_batch(model, sequences, case)
                stepped = str(tmp_path / f"{family}-{case.name}-stepped") if case.steps > 1 else None
                expected[family, case.name] = _reference_steps(hf_dir, batch, case, stepped)
                jobs.append((family, case, batch, stepped))
    return jobs, expected


def _check(per_rank: list[dict], expected: dict) -> None:
    for rank, results in enumerate(per_rank):
        for (layout, family, case_name), (metrics, diffs) in results.items():
            where = (rank, layout, family, case_name)
            want = expected[family, case_name]
            got = [m["actor/grad_norm"] for m in metrics]
            assert got == pytest.approx(want, rel=1e-5), where
            assert metrics[0] == per_rank[0][layout, family, case_name][0][0], where  # same metrics on every rank
            if case_name == "ppo":
                assert 0 < metrics[0]["actor/clipfrac"] < 1, where  # the noise on old log-probs clips some tokens
            if diffs is not None:
                to_reference, moved = diffs
                assert to_reference < 1e-6 and moved > 1e-3, (*where, diffs)  # 2 Adam steps of lr 1e-3


def test_single_process_gradient_and_adam_step_equal_transformers(tmp_path):
    models = _models(tmp_path)
    jobs, expected = _jobs_and_reference(
        tmp_path, models, ["ppo", "ppo_1mb", "terms", "own_ref", "injected", "seq_mis", "minibatch"]
    )
    # log-probs from hidden states 5 response tokens at a time (several chunks per micro-batch), from the
    # model's full logits, and over packed micro-batches: all equal the transformers reference
    layouts = [("tp1", 1, 1, None, CHUNK5), ("tp1_full_logits", 1, 1, None, FULL), ("tp1_packed", 1, 1, None, PACKED)]
    results = run_gloo(_train_worker, 1, models, layouts, jobs)
    _check(results, expected)
    for family in FAMILIES:  # the same gradient from 1 and from 4+ micro-batches
        assert results[0]["tp1", family, "ppo_1mb"][0][0]["actor/micro_batches"] == 1
        assert results[0]["tp1", family, "ppo"][0][0]["actor/micro_batches"] >= 4
    metrics = results[0]["tp1", "qwen2", "own_ref"][0][0]
    assert metrics["actor/kl_loss"] == 0.0  # the reference is the initial policy
    assert metrics["actor/lr"] == pytest.approx(ADAM["lr"])
    # injected sequences count in the trained tokens but not in the train-vs-rollout statistics
    batch = next(b for _, case, b, _ in jobs if case.name == "injected")
    sampled = [i for i, off in enumerate(batch.offline) if not off]
    gaps = torch.cat([(batch.old_logprobs[i] - batch.rollout_logprobs[i]).abs() for i in sampled])
    metrics = results[0]["tp1", "llama", "injected"][0][0]
    assert metrics["rollout/logp_gap_mean"] == pytest.approx(gaps.mean().item(), rel=1e-5)
    assert metrics["rollout/logp_gap_max"] == pytest.approx(gaps.max().item(), rel=1e-5)
    assert metrics["actor/response_tokens"] == sum(len(r) for r in batch.response_ids)
    # two updates a step: the second one's ratio has left 1 (ppo_kl, clip), the cap masked some tokens
    for layout in ("tp1", "tp1_packed"):
        first_step = results[0][layout, "qwen2", "minibatch"][0][0]
        assert first_step["actor/updates"] == 2.0
        assert first_step["actor/ppo_kl"] != 0.0 and first_step["actor/clipfrac"] > 0
        assert 0 < first_step["rollout/is_masked_frac"] < 1
    # seq_mis: the share of tokens in sequences whose ratio product exceeds the cap, in each layout
    batch = next(b for _, case, b, _ in jobs if case.name == "seq_mis")
    tokens = [len(r) for r in batch.response_ids]
    log_rho = [float((o - r).sum()) for o, r in zip(batch.old_logprobs, batch.rollout_logprobs, strict=True)]
    masked = sum(n for n, lr in zip(tokens, log_rho, strict=True) if lr > math.log(1.1)) / sum(tokens)
    for layout in ("tp1", "tp1_packed"):
        assert results[0][layout, "llama", "seq_mis"][0][0]["rollout/is_masked_frac"] == pytest.approx(masked)


def test_gradient_and_adam_step_are_the_same_at_tp2_pp2_dp2(tmp_path):
    models = _models(tmp_path)
    jobs, expected = _jobs_and_reference(
        tmp_path, models, ["ppo", "terms", "own_ref", "injected", "seq_mis", "minibatch"]
    )
    # chunked log-probs across the vocabulary split (3 tokens a chunk), full logits under PP, packing at TP, PP, DP
    layouts = [
        ("tp2", 2, 1, None, dict(logits_chunk_tokens=3)),
        ("pp2", 1, 2, None, FULL),
        ("dp2", 1, 1, None, {}),
        ("tp2_packed", 2, 1, None, PACKED),
        ("pp2_packed", 1, 2, None, PACKED),
        ("dp2_packed", 1, 1, None, PACKED),
    ]
    _check(run_gloo(_train_worker, 2, models, layouts, jobs), expected)


def test_loss_gradient_and_adam_step_at_cp2_equal_cp1(tmp_path):
    """Two context-parallel ranks (each sequence split across them) against the CP1 layout of the same world
    (DP2) and the transformers reference: the same loss, gradient norm and, after two Adam steps, weights."""
    models = _models(tmp_path)
    jobs, expected = _jobs_and_reference(tmp_path, models, ["ppo", "terms", "own_ref"])
    layouts = [
        ("dp2", 1, 1, None, {}),
        ("cp2", 1, 1, None, dict(context_parallel=2, logits_chunk_tokens=3)),
        ("cp2_full_logits", 1, 1, None, dict(context_parallel=2, **FULL)),
        # every layer rerun in the backward: the K/V all-gathers run again there, in the same order on both ranks
        ("cp2_recompute", 1, 1, None, dict(context_parallel=2, recompute="full")),
    ]
    per_rank = run_gloo(_train_worker, 2, models, layouts, jobs)
    _check(per_rank, expected)
    for (layout, family, case_name), (metrics, _) in per_rank[0].items():
        cp1 = per_rank[0]["dp2", family, case_name][0]
        for key in ("actor/loss", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/response_tokens"):
            got, want = [m[key] for m in metrics], [m[key] for m in cp1]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (layout, family, case_name, key)


@pytest.mark.slow
def test_gradient_and_adam_step_are_the_same_with_interleaved_pipeline(tmp_path):
    # PP=2 x 2 virtual stages: one layer per chunk; micro-batches of one shape, count a multiple of 2
    models = _models(tmp_path)
    jobs, expected = _jobs_and_reference(tmp_path, models, ["ppo", "terms"])
    _check(run_gloo(_train_worker, 2, models, [("pp2vpp2", 1, 2, 2, CHUNK5)], jobs), expected)


@pytest.mark.slow
def test_gradient_and_adam_step_are_the_same_on_four_ranks(tmp_path):
    models = _models(tmp_path)
    jobs, expected = _jobs_and_reference(tmp_path, models, ["ppo", "terms"])
    layouts = [("tp2pp2", 2, 2, None, PACKED), ("tp2dp2", 2, 1, None, FULL), ("pp2dp2", 1, 2, None, CHUNK5)]
    _check(run_gloo(_train_worker, 4, models, layouts, jobs), expected)


@pytest.mark.slow
def test_gradient_and_adam_step_are_the_same_with_cp2_beside_tp_pp_dp_and_interleaving_on_four_ranks(tmp_path):
    # context parallelism next to each other split: K/V gathered per TP head slice, activations passed between
    # pipeline stages as CP parts, gradients reduced over DP x CP, one layer per virtual stage
    models = _models(tmp_path)
    jobs, expected = _jobs_and_reference(tmp_path, models, ["ppo", "terms"])
    layouts = [
        ("tp2cp2", 2, 1, None, dict(context_parallel=2, logits_chunk_tokens=3)),
        ("pp2cp2", 1, 2, None, dict(context_parallel=2)),
        ("dp2cp2", 1, 1, None, dict(context_parallel=2, **FULL)),
        ("pp2vpp2cp2", 1, 2, 2, dict(context_parallel=2, **CHUNK5)),
    ]
    _check(run_gloo(_train_worker, 4, models, layouts, jobs), expected)


class _ParamGroups:
    """What OptimizerParamScheduler touches of an optimizer."""

    def __init__(self) -> None:
        self.param_groups = [{}]


@pytest.mark.parametrize(
    ("schedule", "lrs"),
    [
        # warmup 2 updates from 0: 1/2, 2/2 of lr; then decay over updates 3..6 to min_lr 0.2
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2]),
        # 0.2 + 0.8 * (1 + cos(pi * (k - 2) / 4)) / 2
        ("cosine", [0.5, 1.0, 0.8828427, 0.6, 0.3171573, 0.2, 0.2]),
    ],
)
def test_lr_schedule_warms_up_from_zero_without_a_wasted_update_then_decays(schedule, lrs):
    from lcot_mega.actor import megatron_adapter as ma

    cfg = ActorConfig(lr=1.0, min_lr=0.2, warmup_steps=2, lr_schedule=schedule, lr_decay_steps=6)
    optimizer = _ParamGroups()
    scheduler = ma.build_scheduler(optimizer, cfg)
    got = []
    for _ in lrs:
        scheduler.step(increment=1)  # as train_step does, before each update
        got.append(optimizer.param_groups[0]["lr"])
    assert got == pytest.approx(lrs, abs=1e-6)


def test_a_decaying_schedule_without_its_length_is_refused():
    from lcot_mega.actor import megatron_adapter as ma

    with pytest.raises(ma.ActorSetupError, match=r"actor\.lr_decay_steps > actor\.warmup_steps = 3"):
        ma.build_scheduler(_ParamGroups(), ActorConfig(lr_schedule="cosine", warmup_steps=3))
