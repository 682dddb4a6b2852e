"""Inject every fault kind into real `lcot-mega train` runs of the tiny model and count what survived.

python tools/fault_drills.py [--out DIR] [--family llama|qwen3_moe|qwen2_moe|...] [--set KEY=VALUE ...]

`--family` picks the tiny model (a mixture of experts: `qwen3_moe`, `qwen2_moe`); `--set` adds overrides to every
run (e.g. `actor.routing_replay=rollout`).

A drill survives when the run, after the fault (and the same command again where the fault ends the process),
completes every step. A checkpoint is lost when the fault leaves a committed one unloadable (checked right after
the faulty run, before any resume could repair anything), or leaves no loadable checkpoint at all. Prints a
markdown table (the README's figures come from it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lcot_mega.checkpoint.store import CheckpointStore, CheckpointStoreError, verify_checkpoint_dir
from lcot_mega.observe import read_metrics
from lcot_mega.utils.tiny_model import FAMILIES, MOE_FAMILIES, make_tiny_model_dir

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
STEPS = 6
BASE = (f"trainer.steps={STEPS}", "trainer.save_every=1", "trainer.eval_every=0", "eval.at_start=false")
SERVED = ("rollout.served=true", "rollout.max_new_tokens=32", "rollout.request_timeout_s=10")
EXTRA: list[str] = []
"""`--set` overrides, given to every run."""


@dataclass
class Drill:
    name: str
    overrides: tuple[str, ...]
    reruns: int = 0
    """Times the same command is run again after the first (the fault ended the process)."""
    damage_latest: bool = False


DRILLS = [
    Drill("NaN gradient", ("debug.inject.nan_grad_at_step=[3]",)),
    Drill("entropy collapse", ("debug.inject.entropy_collapse_at_step=[2]", "guards.entropy.window=2")),
    Drill("killed rollout server", (*SERVED, "debug.inject.kill_engine_at_step=[3]")),
    Drill("hung rollout server", (*SERVED, "debug.inject.hang_engine_at_step=[3]")),
    Drill("SIGTERM", ("debug.inject.sigterm_at_step=[3]",), reruns=1),
    Drill("crash mid-checkpoint", ("debug.inject.crash_in_save_at_step=[3]",), reruns=1),
    Drill("full disk at save", ("debug.inject.disk_full_at_step=[3]",), reruns=1),
    Drill("corrupt newest checkpoint", ("trainer.steps=3",), reruns=1, damage_latest=True),
]  # fmt: skip


def _run(run: Path, model: Path, overrides: tuple[str, ...]) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lcot_mega.cli", "train", str(TINY), f"model.path={model}", *BASE, *EXTRA, *overrides]
    return subprocess.run([*args, "--run-dir", str(run)], capture_output=True, text=True, timeout=600)


def _unloadable(root: Path) -> int:
    """Committed checkpoints (a `step_N` dir, not a temp dir) that no longer verify; 1 more if none is left."""
    store = CheckpointStore(root, is_writer=False)
    bad = 0
    for step in store.steps():
        try:
            verify_checkpoint_dir(store.path_for(step))
        except CheckpointStoreError:
            bad += 1
    return bad + (store.latest_valid() is None)


def _damage_newest(root: Path) -> None:
    store = CheckpointStore(root, is_writer=False)
    newest = store.path_for(store.latest_valid().step)
    victim = next(p for p in sorted((newest / "model").iterdir()) if p.suffix == ".distcp")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))


def run_drill(drill: Drill, model: Path, work: Path) -> tuple[str, bool, int]:
    """(how the last run ended, whether every step completed, checkpoints the fault left unloadable)."""
    run = work / drill.name.replace(" ", "-")
    proc = _run(run, model, drill.overrides)
    lost = _unloadable(run / "checkpoints")  # right after the fault, before anything repairs it
    if drill.damage_latest:
        _damage_newest(run / "checkpoints")
    rerun = tuple(o for o in drill.overrides if not o.startswith(("debug.inject", "trainer.steps")))
    for _ in range(drill.reruns):
        proc = _run(run, model, rerun)
    steps = sorted({r["step"] for r in read_metrics(run / "metrics.jsonl")} - {0})
    survived = proc.returncode == 0 and steps == list(range(1, STEPS + 1))
    first, last = (steps[0], steps[-1]) if steps else ("-", "-")
    return f"exit {proc.returncode}, steps {first}..{last}", survived, lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--family", default="llama", choices=(*FAMILIES, *MOE_FAMILIES), help="the tiny model")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args()
    EXTRA.extend(args.set)
    work = Path(args.out or tempfile.mkdtemp(prefix="lcot-drills-"))
    model = make_tiny_model_dir(work / f"tiny-{args.family}", args.family)
    rows, survived, lost = [], 0, 0
    for drill in DRILLS:
        outcome, ok, n_lost = run_drill(drill, model, work)
        rows.append(f"| {drill.name} | {outcome} | {'yes' if ok else 'NO'} | {n_lost} |")
        survived, lost = survived + ok, lost + n_lost
        print(rows[-1], flush=True)
    print("\n| fault | final run | survived | checkpoints lost |\n| --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\n{len(DRILLS)} fault kinds injected, {survived} runs survived, {lost} checkpoints lost ({work})")


if __name__ == "__main__":
    main()
