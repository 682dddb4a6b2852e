"""`lcot-mega check`: the preflight `lcot-mega train` runs (`trainer.preflight`), then a self-test of the installed
components (grading in isolated workers, the RL math)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

from lcot_mega import algo
from lcot_mega.config import Config, save_config
from lcot_mega.reward import Grader
from lcot_mega.trainer.preflight import check_before_training

# (response, gold, expected correct): a fraction against a decimal, a wrong answer, malformed LaTeX,
# and an answer that would hold math-verify forever without process isolation.
_GRADER_PROBES = (
    ("... so the answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("The total is \\boxed{7}.", "8", False),
    ("\\boxed{\\frac{1}{", "1", False),
    ("\\boxed{9^{9^{9^9}}}", "1", False),
)
_OPTIONAL_PACKAGES = ("megatron.core", "transformers", "ray", "transformer_engine", "sglang", "vllm", "wandb")


def _grader_self_test(cfg: Config) -> bool:
    t0 = time.perf_counter()
    with Grader(cfg.reward.fn, num_workers=cfg.reward.num_workers, timeout_s=min(cfg.reward.timeout_s, 2.0)) as g:
        started = time.perf_counter() - t0
        results = g.grade_batch([p[0] for p in _GRADER_PROBES], [p[1] for p in _GRADER_PROBES])
    ok = all(r.correct == expected for r, (_, _, expected) in zip(results, _GRADER_PROBES, strict=True))
    timed_out = sum(r.timed_out for r in results)
    print(
        f"grader: {cfg.reward.num_workers} isolated workers started in {started:.1f} s; "
        f"{len(results)} probes graded as expected: {ok} ({timed_out} overran and was killed)"
    )
    return ok


def _algo_self_test(cfg: Config) -> bool:
    """One group of 4 graded samples and one all-correct group through advantages, selection and metrics."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1])
    correct = rewards > 0.5
    adv = algo.group_advantages(rewards, group_ids, cfg.algo.advantage, cfg.algo.adv_eps)
    keep = algo.select_by_polarity(
        adv,
        correct,
        group_ids,
        cfg.algo.polarity,
        cfg.algo.reserve_ratio,
        cfg.algo.reserve_min,
        generator=torch.Generator().manual_seed(0),
    )
    m = algo.batch_metrics(adv, correct, group_ids, keep=keep)
    print(
        f"algo: {cfg.algo.advantage} advantages {[round(a, 3) for a in adv.tolist()]}, "
        f"polarity={cfg.algo.polarity} keeps {int(keep.sum())}/6, zero-advantage groups "
        f"{m['adv/zero_frac_groups']:.2f}, positive share {m['polarity/pos_share']:.2f}"
    )
    return m["adv/zero_frac_groups"] == 0.5


def run_checks(cfg: Config, run_dir: str | None = None) -> bool:
    """Preflight `cfg` (ConfigError), write it into the run directory, self-test grading and the RL math; print a
    report."""
    check_before_training(cfg)
    path = save_config(cfg, Path(run_dir or cfg.trainer.run_dir) / "config.yaml")
    print(f"config: valid; resolved config written to {path}")
    found = {name: importlib.util.find_spec(name.split(".")[0]) is not None for name in _OPTIONAL_PACKAGES}
    print("optional packages: " + ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok in found.items()))
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    ok = _grader_self_test(cfg) and _algo_self_test(cfg)
    print("check: " + ("all components work" if ok else "FAILED"))
    return ok
