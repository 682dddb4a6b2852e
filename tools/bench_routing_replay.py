"""Routing replay (R3): the train-vs-rollout log-prob gap of a mixture of experts with and without replay.

The random `tiny-moe` Qwen3-MoE of bench_models.py (hidden 64, 4 layers, 8 experts, top-2; no download) samples
responses in an embedded engine that runs in bf16 or fp32 (`--engine-dtypes`), reporting the experts it routed each
token to (`return_routed_experts`). The fp32 Megatron actor (one gloo rank) then scores the same sequences twice:
routing them itself (`actor.routing_replay: off`) and replaying the engine's experts (`rollout`). Per response
token, the gap is |actor log-prob - engine log-prob| (temperature 1, no truncation: the engine's is the model's).
Also: the share of (token, layer) routing decisions in which the actor's own top-2 set differs from the engine's
(`moe/replay_mismatch`), and the seconds of one log-prob pass each way (median of `--repeats`). One row per engine
dtype and mode, pooled over `--seeds` prompt sets.

    python tools/bench_routing_replay.py [--prompts 16] [--samples 4] [--max-new 48] [--seeds 0 1 2]
        [--engine-dtypes bfloat16 float32] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _sample(model_dir: str, dtype: str, seed: int, args: argparse.Namespace) -> list[tuple]:
    from lcot_mega.rollout import EmbeddedEngine
    from lcot_mega.rollout.protocol import SamplingParams

    engine = EmbeddedEngine(model_dir, dtype=getattr(torch, dtype), seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 96, (16,), generator=g).tolist() for _ in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.max_new, n=args.samples, seed=seed, return_routed_experts=True)
    out = []
    for prompt, group in zip(prompts, engine.generate(prompts, params), strict=True):
        out += [(prompt, c.token_ids, c.logprobs, c.routed_experts) for c in group if c.token_ids]
    return out


def _worker(rank: int, world: int, model_dir: str, args: argparse.Namespace) -> list[dict]:
    from transformers import AutoConfig

    from lcot_mega.actor import routing
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    arch = arch_from_hf_config(AutoConfig.from_pretrained(model_dir))
    actor = MegatronActor(arch, ActorConfig(micro_batch_tokens=8192), AlgoConfig(), model_dir)
    rows = []
    for dtype in args.engine_dtypes:
        samples = [s for seed in args.seeds for s in _sample(model_dir, dtype, seed, args)]
        sequences = [(p, r) for p, r, _, _ in samples]
        engine_logp = torch.cat([torch.tensor(lp) for _, _, lp, _ in samples])
        routes = [rt for _, _, _, rt in samples]
        for mode, given in (("off", None), ("rollout", routes)):
            seconds = []
            for _ in range(args.repeats):
                routing.start_counting(actor.chunks)
                start = time.perf_counter()
                logp = actor.compute_logprobs(sequences, routing=given)
                seconds.append(time.perf_counter() - start)
                counts = routing.moe_metrics(actor.chunks, arch.num_layers, arch.num_experts)
            gap = (torch.cat(logp) - engine_logp).abs()
            rows.append(
                dict(
                    engine=dtype,
                    replay=mode,
                    tokens=int(gap.numel()),
                    gap_mean=float(gap.mean()),
                    gap_p99=float(gap.quantile(0.99)),
                    gap_max=float(gap.max()),
                    over_0_1=float((gap > 0.1).float().mean()),
                    mismatch=counts.get("moe/replay_mismatch", 0.0) if mode == "rollout" else None,
                    seconds=statistics.median(seconds),
                )
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--engine-dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from bench_models import prepare_model

    from lcot_mega.utils.distributed import run_local

    model_dir = str(prepare_model("tiny-moe"))
    (rows,) = run_local(_worker, 1, model_dir, args, threads=torch.get_num_threads(), timeout_s=3600)
    base = {r["engine"]: r["seconds"] for r in rows if r["replay"] == "off"}
    print(
        f"{'engine':>9} {'replay':>8} {'tokens':>7} {'gap mean':>9} {'gap p99':>8} {'gap max':>8} {'>0.1':>6}"
        f" {'mismatch':>9} {'s/pass':>7} {'x off':>6}"
    )
    for r in rows:
        mismatch = "" if r["mismatch"] is None else f"{r['mismatch']:.4f}"
        print(
            f"{r['engine']:>9} {r['replay']:>8} {r['tokens']:>7} {r['gap_mean']:>9.5f} {r['gap_p99']:>8.4f}"
            f" {r['gap_max']:>8.4f} {r['over_0_1']:>6.3f} {mismatch:>9} {r['seconds']:>7.3f}"
            f" {r['seconds'] / base[r['engine']]:>6.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
