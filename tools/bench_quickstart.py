"""The quick start against a plain-PyTorch GRPO loop on the same box, task, prompts, grader and clock, over seeds.

python tools/bench_quickstart.py [--seeds S [S ...]] [--config configs/quickstart.yaml] [--out runs/bench-quickstart]
    [--json PATH] [--write-doc [--doc docs/PERFORMANCE.md]] [key=value ...]

STACK-NOTES.md sets the bar: the product's quick start should learn at least as fast per minute as a minimal
GRPO loop with no framework (transformers generate with a KV cache from a bf16 copy, an fp32 master model
under bf16 autocast, AdamW, the same recipe). Per seed (default: the config's trainer.seed) this runs
`lcot-mega train CONFIG trainer.seed=S` first, then that loop with the same seed for the wall-clock time the
whole command took, and evaluates both greedily on the same held-out problems. Seeds run one after another
(product s1, plain s1, product s2, ...) so that a change in background load hits both sides alike.

Points per minute = 100 x (held-out accuracy after - before) / (wall seconds / 60); per seed, ratio = ours /
plain (undefined where the plain loop gained nothing). Prints per-seed results, each side's time split and
update, training accuracy by step, and the mean of the per-seed ratios with a 95% t-interval over seeds; writes
both sides' per-step records to --json (default OUT/bench_quickstart.json) for curves; `--write-doc` puts the
report in the `## Learning per minute` section of docs/PERFORMANCE.md. Run it on an otherwise idle machine:
wall-clock time is the budget both get (one seed of the quick start takes about 20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_all import REPO, describe_machine, md_table

from lcot_mega.config import Config, load_config
from lcot_mega.observe import read_metrics

SECTION = "## Learning per minute"
SIDES = ("lcot-mega train", "plain PyTorch loop")


# ----------------------------------------------------------------------------- what each side did


@dataclass(frozen=True)
class StepRecord:
    """One RL step of either side: where its seconds went, what it trained on."""

    step: int
    elapsed_s: float
    """From the side's start to the end of this step, the evaluation after it included."""
    step_s: float
    """Generation to weight sync (the product's `perf/step_s`)."""
    rollout_s: float
    """Generation; the product's `perf/rollout_s` holds its grading too."""
    grade_s: float | None
    """Grading; None where not recorded apart (the product: inside `perf/rollout_s`)."""
    train_s: float
    sync_s: float
    eval_s: float
    """Held-out evaluation after this step, 0 when none (the product's: the gap between its metrics lines less
    `perf/step_s`, i.e. with the logging and guard checks)."""
    accuracy: float
    """Share of the step's generated samples graded correct (the product's `reward/accuracy`)."""
    trained: int
    """Samples the update trained on (0 when no update was applied)."""
    response_tokens: float
    """Response tokens the update trained on."""
    response_len: float
    """Mean response length of the step's generated samples."""
    lr: float | None


@dataclass
class SideRun:
    """One side of one seed: wall time, held-out accuracy before and after, per-step records."""

    side: str
    seed: int
    wall_s: float
    before: float | None
    after: float | None
    setup_s: float
    """Start to the first step: set-up and the evaluation before training."""
    first_eval_s: float | None = None
    """The evaluation before training alone; None where not separable from set-up (the product)."""
    steps: list[StepRecord] = field(default_factory=list)
    final_eval_s: float = 0.0
    """The evaluation after the last step where no step's record holds it (the plain loop's)."""
    evals: list[tuple[int, float]] = field(default_factory=list)
    """(step, held-out accuracy) of every evaluation."""
    error: str | None = None
    load: tuple[float, float] | None = None
    """The 1-minute load average at the side's start and at its end: whether both sides ran under the same."""

    @property
    def points_per_min(self) -> float | None:
        if self.error or self.before is None or self.after is None:
            return None
        return 100 * (self.after - self.before) / (self.wall_s / 60)


def _opt(record: dict[str, Any], key: str) -> float | None:
    """The metric as a float; None when missing or not finite (NaN, null in the file)."""
    value = record.get(key)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _num(record: dict[str, Any], key: str) -> float:
    value = _opt(record, key)
    return 0.0 if value is None else value


def _eval_accuracy(record: dict[str, Any]) -> float | None:
    """The held-out accuracy of a metrics line, the first eval source's (the plain loop evaluates that one)."""
    return next((float(v) for k, v in record.items() if k.startswith("eval/") and k.endswith("/accuracy")), None)


def product_step(record: dict[str, Any], elapsed_s: float, eval_s: float) -> StepRecord:
    """A step line of the product's metrics.jsonl (docs/METRICS.md keys) as a StepRecord."""
    kept = sum(_num(record, f"polarity/kept_{p}_count") for p in ("pos", "neg", "zero"))
    updated = not _num(record, "actor/skipped")
    return StepRecord(
        step=int(record["step"]),
        elapsed_s=elapsed_s,
        step_s=_num(record, "perf/step_s"),
        rollout_s=_num(record, "perf/rollout_s"),
        grade_s=None,
        train_s=_num(record, "perf/train_s"),
        sync_s=_num(record, "perf/sync_s"),
        eval_s=eval_s,
        accuracy=_num(record, "reward/accuracy"),
        trained=int(kept) if updated else 0,
        response_tokens=_num(record, "actor/response_tokens") if updated else 0.0,
        response_len=_num(record, "rollout/response_len_mean"),
        lr=_opt(record, "actor/lr"),
    )


def product_side(records: list[dict[str, Any]], start: float, wall_s: float, seed: int) -> SideRun:
    """The product's run from its metrics lines; `start` is the epoch time its command was started at. A line
    without `perf/step_s` is the evaluation before the first step; the time between a step's line and the one
    before it, less `perf/step_s`, is that step's evaluation where it has one."""
    run = SideRun(SIDES[0], seed, wall_s, None, None, setup_s=0.0)
    previous = None
    for r in records:
        elapsed = r["time"] - start
        accuracy = _eval_accuracy(r)
        if accuracy is not None:
            run.evals.append((int(r["step"]), accuracy))
        if "perf/step_s" not in r:
            run.setup_s = previous = elapsed
            continue
        if previous is None:  # no evaluation before training: set-up ends where the first step starts
            run.setup_s = previous = elapsed - _num(r, "perf/step_s")
        gap = elapsed - previous - _num(r, "perf/step_s")
        run.steps.append(product_step(r, elapsed, max(gap, 0.0) if accuracy is not None else 0.0))
        previous = elapsed
    if run.evals:
        run.before, run.after = run.evals[0][1], run.evals[-1][1]
    return run


def run_product(config: str, overrides: list[str], run_dir: Path, seed: int) -> SideRun:
    """`lcot-mega train` as the README runs it, timed from outside; a failed run (e.g. halted by a guard, exit 3)
    comes back with `error` set and the records it wrote."""
    start, t0, load = time.time(), time.perf_counter(), os.getloadavg()[0]
    cmd = [sys.executable, "-m", "lcot_mega.cli", "train", config, *overrides, "--run-dir", str(run_dir), "--no-resume"]
    code = subprocess.run(cmd).returncode
    wall = time.perf_counter() - t0
    metrics = run_dir / "metrics.jsonl"
    run = product_side(read_metrics(metrics) if metrics.exists() else [], start, wall, seed)
    run.load = (load, os.getloadavg()[0])
    if code != 0 or len(run.evals) < 2:
        run.error = f"exit code {code}" if code != 0 else "fewer than two evaluations"
    return run


# ----------------------------------------------------------------------------- the plain loop


class PlainLoop:
    """GRPO with no framework: one process, transformers only (the STACK-NOTES reference recipe)."""

    def __init__(self, cfg: Config) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lcot_mega.data import build_data
        from lcot_mega.reward.grader import Grader

        torch.manual_seed(cfg.trainer.seed)
        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(cfg.model.path, padding_side="left")
        self.policy = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
        self.sampler = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.bfloat16).eval()
        self.policy.get_input_embeddings().weight.requires_grad_(False)  # tied with the output layer: frozen
        a = cfg.actor
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=a.lr, betas=(a.adam_beta1, a.adam_beta2), weight_decay=0.0)
        self.stream, evals = build_data(cfg.data, self.tok, cfg.trainer.seed)
        self.eval_set = next(iter(evals.values()))
        self.grader = Grader(cfg.reward.fn, num_workers=cfg.reward.num_workers, fallbacks=cfg.reward.fallbacks)

    def generate(self, prompts: list[list[int]], n: int, greedy: bool) -> list[list[int]]:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        with torch.no_grad():
            out = self.sampler.generate(
                input_ids=ids.repeat_interleave(n, 0),
                attention_mask=mask.repeat_interleave(n, 0),
                do_sample=not greedy,
                temperature=None if greedy else self.cfg.rollout.temperature,
                top_p=None,
                top_k=None,
                max_new_tokens=self.cfg.rollout.max_new_tokens,
                pad_token_id=pad,
            )
        responses = []
        for row in out[:, width:].tolist():
            cut = row.index(self.tok.eos_token_id) + 1 if self.tok.eos_token_id in row else len(row)
            responses.append(row[:cut])
        return responses

    def accuracy(self) -> float:
        prompts = [list(p.token_ids) for p in self.eval_set]
        responses = []
        for i in range(0, len(prompts), 50):
            responses += self.generate(prompts[i : i + 50], 1, greedy=True)
        texts = self.tok.batch_decode(responses, skip_special_tokens=True)
        graded = self.grader.grade_batch(texts, [p.answer for p in self.eval_set])
        return sum(g.correct for g in graded) / len(graded)

    def step(self, step: int) -> StepRecord:
        """generate -> grade -> advantages and update -> sync, each timed; `elapsed_s` is left to the caller."""
        n = self.cfg.rollout.n_samples
        t0 = time.perf_counter()
        prompts = self.stream.next_prompts(self.cfg.trainer.prompts_per_step)
        responses = self.generate([list(p.token_ids) for p in prompts], n, greedy=False)
        t1 = time.perf_counter()
        texts = self.tok.batch_decode(responses, skip_special_tokens=True)
        answers = [p.answer for p in prompts for _ in range(n)]
        rewards = torch.tensor([float(g.correct) for g in self.grader.grade_batch(texts, answers)])  # [P * n]
        t2 = time.perf_counter()
        groups = rewards.view(-1, n)  # [P, n]
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).flatten()
        keep = [i for i in range(len(responses)) if groups[i // n].std() > 0 and responses[i]]
        if keep:
            self.update([list(prompts[i // n].token_ids) for i in keep], [responses[i] for i in keep], adv[keep])
        t3 = time.perf_counter()
        if keep:
            self.sampler.load_state_dict(self.policy.state_dict())  # the bf16 rollout copy follows the policy
        t4 = time.perf_counter()
        return StepRecord(
            step=step,
            elapsed_s=0.0,
            step_s=t4 - t0,
            rollout_s=t1 - t0,
            grade_s=t2 - t1,
            train_s=t3 - t2,
            sync_s=t4 - t3,
            eval_s=0.0,
            accuracy=float(rewards.mean()),
            trained=len(keep),
            response_tokens=float(sum(len(responses[i]) for i in keep)),
            response_len=statistics.fmean(len(r) for r in responses),
            lr=self.cfg.actor.lr,
        )

    def update(self, prompts: list[list[int]], responses: list[list[int]], adv: torch.Tensor) -> None:
        """One token-mean policy-gradient step (on-policy: the PPO ratio is 1, clipping inactive)."""
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        resp = torch.zeros(len(seqs), width - 1)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            resp[i, len(p) - 1 : len(p) - 1 + len(r)] = 1.0  # positions whose next token is a response token
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = self.policy(input_ids=ids).logits[:, :-1].float()  # [B, T-1, V]
        logp = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None]).squeeze(2)  # [B, T-1]
        loss = -(logp * adv[:, None] * resp).sum() / resp.sum()
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.actor.grad_clip)
        self.opt.step()


def run_plain(cfg: Config, budget_s: float) -> SideRun:
    """The plain loop for `budget_s` seconds from its own start (set-up and both evaluations included)."""
    t0, load = time.perf_counter(), os.getloadavg()[0]
    loop = PlainLoop(cfg)
    t1 = time.perf_counter()
    first = loop.accuracy()
    t2 = time.perf_counter()  # the first step starts
    steps: list[StepRecord] = []
    while time.perf_counter() - t0 + (t2 - t1) < budget_s:  # leave the final evaluation inside the budget
        record = loop.step(len(steps) + 1)
        steps.append(replace(record, elapsed_s=time.perf_counter() - t0))
    t3 = time.perf_counter()
    last = loop.accuracy()
    t4 = time.perf_counter()
    loop.grader.close()
    run = SideRun(SIDES[1], cfg.trainer.seed, time.perf_counter() - t0, first, last, t2 - t0, t2 - t1, steps, t4 - t3)
    run.evals, run.load = [(0, first), (len(steps), last)], (load, os.getloadavg()[0])
    return run


# ----------------------------------------------------------------------------- statistics

# t_{0.975, df} for df = 1..30 (two-sided 95%); beyond, the Cornish-Fisher expansion around the normal quantile.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
T_975 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (scipy's where it imports)."""
    try:
        from scipy.stats import t
    except ImportError:
        if df <= len(T_975):
            return T_975[df - 1]
        z = 1.959964
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class RatioStats:
    """Per-seed ratios of points per minute (ours / plain) and their mean with a 95% t-interval over seeds."""

    ratios: list[float | None]
    """Per seed; None where the plain loop gained nothing (zero or negative points: no ratio)."""
    n: int
    """Seeds with a ratio."""
    mean: float | None
    sd: float | None
    """Sample standard deviation (n - 1) of the ratios; None below two seeds."""
    half_width: float | None
    """t_{0.975, n-1} x sd / sqrt(n)."""
    ratio_of_means: float | None
    """Mean points per minute of ours / of plain over every seed; None when plain's mean is not positive."""

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.mean is None or self.half_width is None:
            return None
        return self.mean - self.half_width, self.mean + self.half_width


def ratio_stats(ours: list[float], plain: list[float]) -> RatioStats:
    """Points per minute of both sides per seed -> the ratios' mean, sd and 95% t-interval (Student 1908)."""
    ratios = [o / p if p > 0 else None for o, p in zip(ours, plain, strict=True)]
    defined = [r for r in ratios if r is not None]
    n = len(defined)
    mean = statistics.fmean(defined) if n else None
    sd = statistics.stdev(defined) if n > 1 else None
    half = t_975(n - 1) * sd / math.sqrt(n) if sd is not None else None
    plain_mean = statistics.fmean(plain) if plain else 0.0
    of_means = statistics.fmean(ours) / plain_mean if plain_mean > 0 else None
    return RatioStats(ratios, n, mean, sd, half, of_means)


def final_line(stats: RatioStats) -> str:
    head = f"lcot-mega / plain, points per minute over {stats.n} seeds: "
    if stats.mean is None:
        return head + "undefined (the plain loop gained nothing on any seed)"
    ci = stats.interval
    return head + f"{stats.mean:.2f} " + (f"(95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else "(95% CI undefined: one seed)")


# ----------------------------------------------------------------------------- the report


def pairs(runs: list[SideRun]) -> list[tuple[SideRun, SideRun | None]]:
    """(ours, plain) per seed in running order; plain None where ours failed (it then does not run)."""
    out = []
    for run in runs:
        if run.side == SIDES[0]:
            out.append((run, None))
        elif out and out[-1][0].seed == run.seed:
            out[-1] = (out[-1][0], run)
    return out


def complete(runs: list[SideRun]) -> list[tuple[SideRun, SideRun]]:
    """The seeds where both sides ran to the end."""
    return [(o, p) for o, p in pairs(runs) if p is not None and o.error is None and p.error is None]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def _ratio_cell(ours: SideRun, plain: SideRun | None, ratio: dict[int, float | None]) -> str:
    """The seed's ratio, `undefined` where the plain loop gained nothing, or why there is none."""
    if ours.error or plain is None or plain.error:
        return f"- ({ours.error or (plain.error if plain else 'plain not run')})"
    r = ratio[ours.seed]
    return "undefined (plain gained nothing)" if r is None else f"{r:.2f}"


def seed_table(runs: list[SideRun], stats: RatioStats) -> str:
    ratio = {o.seed: r for (o, _), r in zip(complete(runs), stats.ratios, strict=True)}
    rows = []
    for ours, plain in pairs(runs):
        for run in (ours, plain) if plain else (ours,):
            cells = [str(run.seed), run.side, f"{run.wall_s:.0f}", str(len(run.steps)), _pct(run.before)]
            load = f"{run.load[0]:.1f} / {run.load[1]:.1f}" if run.load else "-"
            cells += [_pct(run.after), _rate(run.points_per_min), load]
            rows.append([*cells, _ratio_cell(ours, plain, ratio) if run is ours else ""])
    headers = ["seed", "side", "wall s", "steps", "held-out before", "after", "points / min"]
    return md_table([*headers, "load 1 min start / end", "ratio"], rows)


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def split_row(runs: list[SideRun]) -> list[str]:
    """One side's time split, means over its runs: totals per run, then seconds per step."""
    steps = [s for r in runs for s in r.steps]
    evals = [sum(s.eval_s for s in r.steps) + r.final_eval_s for r in runs]
    other = [r.wall_s - r.setup_s - sum(s.step_s for s in r.steps) - e for r, e in zip(runs, evals, strict=True)]
    totals = [_mean([r.wall_s for r in runs]), _mean([r.setup_s for r in runs]), _mean([len(r.steps) for r in runs])]
    per_step = [_mean([getattr(s, k) for s in steps]) for k in ("step_s", "rollout_s", "train_s", "sync_s")]
    grades = [s.grade_s for s in steps if s.grade_s is not None]
    grade = f"{_mean(grades):.2f}" if grades else "in rollout"
    cells = [f"{totals[0]:.0f}", f"{totals[1]:.0f}", f"{totals[2]:.1f}"] + [f"{x:.2f}" for x in per_step[:2]] + [grade]
    return [runs[0].side, *cells, *(f"{x:.2f}" for x in per_step[2:]), f"{_mean(evals):.0f}", f"{_mean(other):.0f}"]


def split_table(runs: list[SideRun]) -> str:
    both = complete(runs)
    headers = ["side", "wall s", "set-up + first eval s", "steps", "s / step", "rollout s / step"]
    headers += ["grading s / step", "train s / step", "sync s / step", "later evals s", "other s"]
    return md_table(headers, [split_row([pair[i] for pair in both]) for i in (0, 1)])


def _precision(cfg: Config) -> str:
    p = cfg.actor.precision
    if p == "auto":  # megatron_adapter.params_dtype
        p = "bf16" if torch.cuda.is_available() else "fp32"
    return {"fp32": "fp32", "bf16": "bf16", "bf16_autocast": "fp32 master, bf16 autocast"}[p]


def update_table(runs: list[SideRun], cfg: Config) -> str:
    """What each side's update is made of: learning rate, loss, samples and tokens, precision."""
    both = complete(runs)
    ours = [s for o, _ in both for s in o.steps]
    plain = [s for _, p in both for s in p.steps]
    lrs = sorted({s.lr for s in ours if s.lr is not None})
    our_lr = f"{lrs[0]:.2g}" + (f" to {lrs[-1]:.2g}" if len(lrs) > 1 else "") if lrs else "-"
    loss = f"{cfg.algo.loss_agg}, PPO clip {cfg.algo.clip_low}/{cfg.algo.clip_high}"
    rows = [
        [SIDES[0], our_lr, loss, _precision(cfg), f"{cfg.model.dtype} engine"],
        [
            SIDES[1],
            f"{cfg.actor.lr:.2g}",
            "token-mean, no clip (on-policy)",
            "fp32 master, bf16 autocast",
            "bfloat16 copy",
        ],
    ]
    for row, steps in zip(rows, (ours, plain), strict=True):
        row += [f"{_mean([s.trained for s in steps]):.1f}", f"{_mean([s.response_tokens for s in steps]):.0f}"]
        row += [f"{_mean([s.response_len for s in steps]):.1f}"]
    headers = ["side", "learning rate", "loss aggregation", "actor precision", "rollout weights"]
    return md_table([*headers, "samples trained / step", "tokens trained / step", "response length"], rows)


def curve_table(runs: list[SideRun], buckets: int = 8) -> str:
    """Training accuracy (share of generated samples correct) by step, averaged over seeds and a few steps."""
    both = complete(runs)
    last = max((len(r.steps) for pair in both for r in pair), default=0)
    width = max(1, math.ceil(last / buckets))
    rows = []
    for lo in range(1, last + 1, width):
        hi = min(lo + width - 1, last)
        cells = [f"{lo}-{hi}" if hi > lo else str(lo)]
        for i in (0, 1):
            acc = [s.accuracy for pair in both for s in pair[i].steps if lo <= s.step <= hi]
            cells.append(_pct(_mean(acc)) if acc else "-")
        rows.append(cells)
    return md_table(["steps", *(f"{side}: train accuracy" for side in SIDES)], rows)


def render_report(runs: list[SideRun], cfg: Config) -> str:
    """The tables and the closing line, as printed and as written under `## Learning per minute`."""
    both = complete(runs)
    stats = ratio_stats([o.points_per_min for o, _ in both], [p.points_per_min for _, p in both])
    parts = ["Per seed (ratio = our points per minute / plain's):", seed_table(runs, stats)]
    if both:
        parts += ["Time split (means over the seeds both sides completed):", split_table(runs)]
        parts += ["The update each side applies (means per step):", update_table(runs, cfg)]
        parts += ["Training accuracy by step (curves per step in the JSON records):", curve_table(runs)]
    if stats.ratio_of_means is not None:
        parts.append(
            f"Ratio of the mean points per minute over the {len(both)} compared seeds: {stats.ratio_of_means:.2f}."
        )
    left = [str(o.seed) for (o, _), r in zip(both, stats.ratios, strict=True) if r is None]
    failed = [f"{o.seed} ({o.error or p.error})" for o, p in pairs(runs) if o.error or (p and p.error)]
    if left:
        parts.append(f"Left out of the mean, the plain loop gaining nothing: seed {', '.join(left)}.")
    if failed:
        parts.append(f"Not compared, a side failed: seed {', '.join(failed)}.")
    return "\n\n".join([*parts, final_line(stats)])


WHAT = (
    "`tools/bench_quickstart.py`: the quick start (`lcot-mega train`) against a plain-PyTorch GRPO loop (transformers"
    " generate from a bf16 copy, an fp32 master model under bf16 autocast, AdamW, the same recipe, prompts, grader and"
    " held-out problems), per seed the product first and then the plain loop for the same wall-clock time. Points per"
    " minute = 100 x (held-out accuracy after - before) / wall minutes; the closing line is the mean of the per-seed"
    " ratios with a 95% t-interval over seeds."
)
MACHINE_KEYS = ("CPU", "cores usable (sched_getaffinity) / online", "load average at start (1, 5, 15 min)", "torch")
MACHINE_KEYS += ("megatron-core", "transformers", "git commit", "date (UTC)")


def render_section(machine: dict[str, str], report: str) -> str:
    """The `## Learning per minute` section: what was compared, the machine, the command, the report."""
    table = md_table(["machine", "value"], [[k, machine[k]] for k in MACHINE_KEYS if k in machine])
    return f"{SECTION}\n\n{WHAT}\n\n{table}\n\nCommand: `{machine['command']}`\n\n{report}"


def replace_section(doc: str, section: str) -> str:
    """`doc` with the section titled as `section`'s first line replaced by it, or with it appended."""
    title = section.split("\n", 1)[0]
    head, *rest = ("\n" + doc.rstrip("\n")).split("\n## ")
    parts = ["## " + chunk.rstrip("\n") for chunk in rest]
    titles = [part.split("\n", 1)[0].rstrip() for part in parts]
    if title in titles:
        parts[titles.index(title)] = section.rstrip("\n")
    else:
        parts.append(section.rstrip("\n"))
    return "\n\n".join([head.strip("\n")] * bool(head.strip()) + parts) + "\n"


def write_json(path: Path, machine: dict[str, str], runs: list[SideRun]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) | {"points_per_min": r.points_per_min} for r in runs]
    path.write_text(json.dumps({"machine": machine, "runs": rows}, indent=1) + "\n")


# ----------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="trainer.seed per pair (default: config's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quickstart"), help="run directories go here")
    parser.add_argument("--json", type=Path, default=None, help="per-step records (default OUT/bench_quickstart.json)")
    parser.add_argument("--write-doc", action="store_true", help=f"write the report as `{SECTION}` of --doc")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    parser.add_argument("overrides", nargs="*", help="config overrides for both loops, e.g. trainer.steps=20")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    seeds = args.seeds or [cfg.trainer.seed]
    taken = [str(d) for s in seeds if (d := args.out / f"seed{s}" / "product").exists()]
    if taken:
        sys.exit(f"bench_quickstart: {', '.join(taken)} exists; choose another --out or remove it")
    machine = describe_machine(shlex.join(["python", "tools/bench_quickstart.py", *sys.argv[1:]]))
    json_path = args.json or args.out / "bench_quickstart.json"
    runs: list[SideRun] = []
    for seed in seeds:
        overrides = [*args.overrides, f"trainer.seed={seed}"]
        runs.append(run_product(args.config, overrides, args.out / f"seed{seed}" / "product", seed))
        if runs[-1].error is None:
            runs.append(run_plain(load_config(args.config, overrides), runs[-1].wall_s))
        write_json(json_path, machine, runs)  # after every seed: an interrupted bench keeps what it measured
    report = render_report(runs, cfg)
    print(f"\n{report}\n\n[bench_quickstart] per-step records: {json_path}")
    if args.write_doc:
        old = args.doc.read_text() if args.doc.is_file() else ""
        args.doc.write_text(replace_section(old, render_section(machine, report)))
        print(f"[bench_quickstart] wrote {SECTION} in {args.doc}")


if __name__ == "__main__":
    main()
