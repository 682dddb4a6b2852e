"""Synchronous vs asynchronous RL (`trainer.max_staleness` k = 0, 1, 2, with and without partial rollout) on one
box, same config and seed.

python tools/bench_async.py [--ks 0 1 2 1p 2p] [--steps 6] [--config configs/quickstart.yaml]
    [--out runs/bench-async] [--json PATH] [key=value ...]

Each k runs `lcot-mega train CONFIG trainer.max_staleness=k` (greedy evaluation of the held-out set before the
first step and after the last), one after the other; a `p` after k adds `rollout.partial=true` (k - 1 steps
sampled ahead, unfinished responses carried into the next step). The default workload has a long tail of response
lengths: the quick start's model and task with the study's "think step by step" prompt and 256 new tokens, so a few
responses of a step run to the limit while most stop at 60-150 tokens. Per k the table gives training seconds
(the sum of `perf/step_s`: evaluation excluded), steps per hour, where a step's seconds went (rollout: sampling
and grading, hidden behind the update or not; exposed rollout: what the actor waited for, i.e. `perf/rollout_s`
at k = 0 and the first step, `perf/rollout_wait_s` after; update; weight sync), staleness, and held-out accuracy
points gained per training minute.

Then a MODEL, not a measurement, of what overlap gives where the engine and the actor have devices of their own
(cluster.mode disaggregated on GPUs): from the k = 0 run's mean rollout R, update T and sync S, a synchronous step
takes R + T + S and a k >= 1 step max(R, T) + S. On this box both sides share 2 cores, so the measured rows say
what overlap buys when they do not have devices of their own. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_all import REPO, describe_machine, md_table
from omegaconf import OmegaConf

from lcot_mega.observe import read_metrics

WORKLOAD = [
    "rollout.max_new_tokens=256",
    # quoted: the value is parsed as YAML (a leading `{` would open a mapping; a backslash is written twice)
    'data.prompt_template="{problem} Let\'s think step by step and output the final answer within \\\\boxed{}."',
    "data.gym_eval_size=60",
    "trainer.prompts_per_step=8",
    "trainer.save_every=0",
    "eval.at_start=true",
]


def run_k(config: str, mode: str, steps: int, out: Path, extra: list[str]) -> dict:
    k, partial = int(mode.rstrip("p")), mode.endswith("p")
    run_dir = out / f"k{mode}"
    args = ["lcot-mega", "train", config, *WORKLOAD, f"trainer.steps={steps}", f"trainer.eval_every={steps}"]
    args += [f"trainer.max_staleness={k}", *(["rollout.partial=true"] if partial else []), *extra]
    args += ["--run-dir", str(run_dir)]
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of an earlier bench
    print("$", shlex.join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(args, check=True, cwd=REPO)
    wall = time.perf_counter() - t0
    records = read_metrics(run_dir / "metrics.jsonl")
    group_size = OmegaConf.load(run_dir / "config.yaml").rollout.n_samples
    return summarize(k, records, wall, partial=partial, group_size=group_size)


def _eval_accuracy(record: dict) -> float:
    values = [v for key, v in record.items() if key.startswith("eval/") and key.endswith("/accuracy")]
    return sum(values) / len(values) if values else float("nan")


def summarize(k: int, records: list[dict], wall: float, *, partial: bool = False, group_size: int = 1) -> dict:
    steps = [r for r in records if r.get("step", 0) > 0 and "perf/step_s" in r]
    n = len(steps)

    def mean(key: str, rows: list[dict] = steps) -> float:
        vals = [r.get(key, 0.0) for r in rows]
        return sum(vals) / len(vals) if vals else 0.0

    # tokens sampled a step: the partial rollout counts them; else every finished response of every group
    generated = mean("rollout/response_len_mean") * mean("rollout/groups_generated") * group_size
    ahead = k - partial  # steps sampled ahead: with none, the whole rollout is exposed
    exposed = [
        r["perf/rollout_s"] if ahead == 0 or r["step"] == 1 else r.get("perf/rollout_wait_s", 0.0) for r in steps
    ]
    train_s = sum(r["perf/step_s"] for r in steps)
    start = next((r for r in records if r.get("step") == 0), {})
    acc0, acc1 = _eval_accuracy(start), _eval_accuracy(records[-1])
    return {
        "k": k,
        "partial": partial,
        "steps": n,
        "wall_s": wall,
        "train_s": train_s,
        "step_s": train_s / n,
        "steps_per_hour": 3600 * n / train_s,
        "rollout_s": mean("perf/rollout_s"),
        "exposed_rollout_s": sum(exposed) / n,
        "update_s": mean("perf/train_s"),
        "sync_s": mean("perf/sync_s"),
        "response_len": mean("rollout/response_len_mean"),
        "truncated_frac": mean("rollout/truncated_frac"),
        "staleness_mean": mean("rollout/staleness_mean"),
        "generated_tokens": mean("rollout/generated_tokens") if partial else generated,
        "multi_version_frac": mean("rollout/multi_version_frac"),
        "span_dropped_groups": sum(r.get("rollout/span_dropped_groups", 0.0) for r in steps),
        "train_accuracy": mean("reward/accuracy"),
        "eval_before": acc0,
        "eval_after": acc1,
        "points_per_min": 100 * (acc1 - acc0) / (train_s / 60),
    }


def render(rows: list[dict]) -> str:
    base = next((r for r in rows if r["k"] == 0 and not r.get("partial")), rows[0])
    head = ["k", "steps", "s/step", "steps/h", "vs k=0", "rollout s", "exposed rollout s", "update s", "sync s"]
    head += ["staleness", "resp. tokens (trunc.)", "tokens sampled", "two-version resp.", "span-dropped groups"]
    head += ["train acc", "held-out before -> after", "points/min"]
    body = []
    for r in rows:
        body.append(
            [
                f"{r['k']}{' + partial' if r.get('partial') else ''}",
                str(r["steps"]),
                f"{r['step_s']:.1f}",
                f"{r['steps_per_hour']:.0f}",
                f"{r['steps_per_hour'] / base['steps_per_hour']:.2f}x",
                f"{r['rollout_s']:.1f}",
                f"{r['exposed_rollout_s']:.1f}",
                f"{r['update_s']:.1f}",
                f"{r['sync_s']:.2f}",
                f"{r['staleness_mean']:.2f}",
                f"{r['response_len']:.0f} ({r['truncated_frac']:.0%})",
                f"{r['generated_tokens']:.0f}",
                f"{r['multi_version_frac']:.0%}",
                f"{r['span_dropped_groups']:.0f}",
                f"{r['train_accuracy']:.1%}",
                f"{r['eval_before']:.1%} -> {r['eval_after']:.1%}",
                f"{r['points_per_min']:+.2f}",
            ]
        )
    R, T, S = base["rollout_s"], base["update_s"], base["sync_s"]
    sync_step, overlapped = R + T + S, max(R, T) + S
    model = (
        f"MODEL (not measured): with devices of their own, from the k=0 means R = {R:.1f} s, T = {T:.1f} s,"
        f" S = {S:.2f} s: synchronous R + T + S = {sync_step:.1f} s, k >= 1 max(R, T) + S = {overlapped:.1f} s,"
        f" {sync_step / overlapped:.2f}x the steps per hour."
    )
    return md_table(head, body) + "\n\n" + model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", nargs="+", default=["0", "1", "2"], help="k, or k followed by p for partial rollout")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--out", type=Path, default=Path("runs/bench-async"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--partial-overrides",
        nargs="*",
        default=[],
        help="key=value overrides for the partial-rollout rows only (rollout.partial_window=32 ...)",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = p.parse_args()
    machine = describe_machine(shlex.join(sys.argv))
    out_dir = args.out if args.out.is_absolute() else REPO / args.out  # the runs' cwd is the repository
    rows = [
        run_k(args.config, k, args.steps, out_dir, args.overrides + (args.partial_overrides if "p" in k else []))
        for k in args.ks
    ]
    report = render(rows)
    print(report)
    out = args.json or out_dir / "bench_async.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"rows written to {out}")


if __name__ == "__main__":
    main()
