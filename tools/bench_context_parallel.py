"""Context parallelism's memory: one actor train step of one N-token sequence at CP = 1 and CP = 2, peak per rank.

Each layout runs in fresh processes (`run_local`, gloo, one thread per rank). A rank builds the actor, resets its
resident-memory high-water mark (writing 5 to /proc/self/clear_refs), runs one train step (clipped policy loss on
the response, backward, Adam) and reports its resident memory before the step and its peak during it (VmHWM).
The step's peak minus the memory before it is what the activations of that rank's share of the sequence cost.

    python tools/bench_context_parallel.py [--model random135m|tiny] [--tokens 2048] [--recompute none|full]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 64


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def step_worker(rank: int, world: int, hf_dir: str, tokens: int, recompute: str) -> dict[str, Any]:
    """One train step at CP = world; this rank's memory before and during it, and the step's time and loss."""
    import torch
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    cfg = ActorConfig(context_parallel=world, recompute=recompute, micro_batch_tokens=tokens, lr=1e-6)
    actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, arch.vocab_size, (tokens,), generator=g).tolist()
    batch = TrainBatch([ids[:PROMPT_TOKENS]], [ids[PROMPT_TOKENS:]], [1.0])
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    t0 = time.perf_counter()
    metrics = actor.train_step(batch)
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    ma.destroy_parallel()
    return dict(before_mib=before, peak_mib=peak, step_s=seconds, loss=metrics["actor/loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("random135m", "tiny"), default="random135m")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--recompute", choices=("none", "full"), default="none")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tools"))
    from bench_models import prepare_model

    from lcot_mega.utils.distributed import run_local

    hf_dir = str(prepare_model(args.model))
    print(
        f"model {args.model}, one sequence of {args.tokens} tokens ({PROMPT_TOKENS} prompt), actor.recompute"
        f" {args.recompute}, one train step per fresh launch, 1 thread per rank, {len(os.sched_getaffinity(0))} cores\n"
    )
    print("| CP | rank | RSS before step MiB | peak in step MiB | step - before MiB | step s | loss |")
    print("|---|---|---|---|---|---|---|")
    for cp in (1, 2):
        for rank, r in enumerate(run_local(step_worker, cp, hf_dir, args.tokens, args.recompute, timeout_s=3600)):
            row = [
                cp,
                rank,
                f"{r['before_mib']:,.0f}",
                f"{r['peak_mib']:,.0f}",
                f"{r['peak_mib'] - r['before_mib']:,.0f}",
            ]
            print("| " + " | ".join(map(str, [*row, f"{r['step_s']:.1f}", f"{r['loss']:.6f}"])) + " |", flush=True)


if __name__ == "__main__":
    main()
