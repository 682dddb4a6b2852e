"""Long-sequence memory: one actor train step of one N-token sequence, peak RSS and seconds, beside plain transformers.

Per N, each side runs in its own fresh process: 64 prompt tokens and N - 64 response tokens, the clipped policy
loss on the response (token-mean, old log-probs = this forward's own), backward and an Adam(W) step. The
Megatron side uses the actor settings of the long-context recipe (`--recipe`, default
configs/long_cot_cpu.yaml: SDPA attention, full recompute, log-probs from hidden states in chunks); the plain
side is transformers (its default SDPA attention) + torch.optim.AdamW on the full logits.

Peak RSS is measured from outside: the parent polls the child's /proc/PID/status and reads its VmHWM (the
kernel's high-water mark of resident memory, reset at exec) after the step, while the child waits. A child
whose resident memory passes `--limit-gib` is killed and reported as OOM, so a plain step that would not fit
does not take the box down.

    python tools/bench_memory.py [--model random135m|smollm2|tiny] [--tokens 2048 8192 ...] [--recipe PATH]
        [--limit-gib 20] [--skip-plain-above N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 64
REPO = Path(__file__).resolve().parent.parent


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def measure(argv: list[str], limit_gib: float, threads: int) -> dict[str, Any]:
    """Run one worker; its result line, its peak RSS read from outside (MiB), or oom/error."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, __file__, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        while True:
            rss = _status_kib(proc.pid, "VmRSS")
            if rss is not None and rss > limit_gib * 2**20:
                proc.kill()
                proc.wait()
                return dict(oom=True, peak_rss_mib=rss / 1024)
            try:
                line = lines.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        peak = _status_kib(proc.pid, "VmHWM")  # read while the worker waits on its stdin
        proc.stdin.close()  # the worker exits
        proc.wait()
        if not line:
            stderr.seek(0)
            return dict(error=f"exit {proc.returncode}: {stderr.read()[-3000:]}")
    result = json.loads(line)
    result["peak_rss_mib"] = peak / 1024 if peak is not None else result["inside_peak_mib"]
    return result


# ----------------------------------------------------------------------------- workers (a fresh process each)


def _sequence(vocab: int, tokens: int) -> tuple[list[int], list[int]]:
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (tokens,), generator=g).tolist()
    return ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:]


def _inside_peak_mib() -> float:
    return (_status_kib(os.getpid(), "VmHWM") or 0) / 1024


def _report_and_wait(result: dict[str, Any]) -> None:
    result["inside_peak_mib"] = _inside_peak_mib()
    print(json.dumps(result), flush=True)
    sys.stdin.read()  # the parent reads /proc/PID/status, then closes our stdin


def megatron_worker(hf_dir: str, tokens: int, recipe: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import load_config
    from lcot_mega.utils.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_config(recipe)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    actor = MegatronActor(arch, cfg.actor, cfg.algo, hf_dir)
    prompt, response = _sequence(arch.vocab_size, tokens)
    batch = TrainBatch([prompt], [response], [1.0], temperature=1.0)
    t0 = time.perf_counter()
    metrics = actor.train_step(batch)
    seconds = time.perf_counter() - t0
    settings = {k: getattr(cfg.actor, k) for k in ("attention", "recompute", "logits_chunk_tokens", "precision")}
    torch.distributed.destroy_process_group()
    _report_and_wait(dict(step_s=seconds, update_ok=metrics["actor/update_ok"], settings=settings))


def plain_worker(hf_dir: str, tokens: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from lcot_mega.algo import policy_loss

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    prompt, response = _sequence(model.config.vocab_size, tokens)
    ids = torch.tensor([prompt + response])  # [1, N]
    labels = ids[:, PROMPT_TOKENS:]  # [1, R]
    mask = torch.ones_like(labels, dtype=torch.bool)
    t0 = time.perf_counter()
    logits = model(ids).logits[:, PROMPT_TOKENS - 1 : -1]  # [1, R, V]
    logp = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]  # [1, R]
    loss, _ = policy_loss(logp, logp.detach(), torch.ones_like(logp), mask, 0.2, 0.2, None, agg="token-mean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    _report_and_wait(dict(step_s=time.perf_counter() - t0))


# ----------------------------------------------------------------------------- driver


def _cell(res: dict[str, Any]) -> tuple[str, str]:
    if res.get("oom"):
        return f"OOM (killed at {res['peak_rss_mib']:,.0f})", "-"
    if "error" in res:
        return "error", "-"
    return f"{res['peak_rss_mib']:,.0f}", f"{res['step_s']:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("random135m", "smollm2", "tiny"), default="random135m")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--recipe", default=str(REPO / "configs" / "long_cot_cpu.yaml"))
    ap.add_argument("--limit-gib", type=float, default=20.0, help="kill a child whose RSS passes this (OOM)")
    ap.add_argument("--skip-plain-above", type=int, default=None, help="no plain step for N above this")
    ap.add_argument("--threads", type=int, default=0, help="threads per child (0: this process's cores)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", choices=("megatron", "plain"), help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "megatron":
        return megatron_worker(args.hf_dir, args.tokens[0], args.recipe)
    if args.worker == "plain":
        return plain_worker(args.hf_dir, args.tokens[0])

    sys.path.insert(0, str(REPO / "tools"))
    from bench_models import prepare_model, progress

    threads = args.threads or len(os.sched_getaffinity(0))
    hf_dir = str(prepare_model(args.model))
    rows, records = [], []
    settings: dict[str, Any] = {}  # from the first step that ran: a later one may be killed (OOM)
    t0 = time.perf_counter()
    for n in args.tokens:
        if n <= PROMPT_TOKENS:
            raise SystemExit(f"--tokens {n}: needs more than the {PROMPT_TOKENS} prompt tokens")
        common = ["--hf-dir", hf_dir, "--tokens", str(n), "--recipe", args.recipe]
        ours = measure(["--worker", "megatron", *common], args.limit_gib, threads)
        settings = settings or ours.get("settings", {})
        skip = args.skip_plain_above is not None and n > args.skip_plain_above
        plain = dict(skipped=True) if skip else measure(["--worker", "plain", *common], args.limit_gib, threads)
        ours_rss, ours_s = _cell(ours)
        plain_rss, plain_s = ("not run", "-") if skip else _cell(plain)
        rows.append(f"| {n:,} | {ours_rss} | {ours_s} | {plain_rss} | {plain_s} |")
        progress(rows[-1] + (f" {ours.get('error', '')[:500]}" if "error" in ours else ""))
        records.append(
            dict(
                tokens=n,
                peak_rss_mib=ours.get("peak_rss_mib"),
                step_s=ours.get("step_s"),
                oom=bool(ours.get("oom")),
                error=ours.get("error"),
                plain_peak_rss_mib=plain.get("peak_rss_mib"),
                plain_step_s=plain.get("step_s"),
                plain_oom=bool(plain.get("oom")),
                plain_skipped=skip,
            )
        )
    print(
        f"\nmodel {args.model}, one sequence of N tokens ({PROMPT_TOKENS} prompt), one train step (policy loss,"
        f" backward, Adam) per fresh process, {threads} threads; actor settings from {args.recipe}: {settings};"
        f" OOM = resident memory passed {args.limit_gib} GiB (killed)\n"
    )
    print("| tokens | lcot-mega peak RSS MiB | step s | plain transformers peak RSS MiB | step s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        meta = dict(model=args.model, recipe=args.recipe, threads=threads, settings=settings, limit_gib=args.limit_gib)
        meta["prompt_tokens"] = PROMPT_TOKENS
        args.json.write_text(json.dumps(dict(meta=meta, rows=records), indent=1))


if __name__ == "__main__":
    main()
