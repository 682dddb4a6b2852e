"""Peak memory and wall time of one EmbeddedEngine.generate call, shared prompt KV vs repeated, in fresh processes.

Each measurement runs in its own process (so one call's allocations cannot lower or raise another's peak): load the
model, warm up with a 4-token call, reset the peak-RSS counter (`/proc/self/clear_refs`, where allowed), time one
`generate` with EOS ignored (every response has max_new_tokens tokens), then read VmHWM from /proc/self/status.

    python tools/bench_prompt_kv.py MODEL_DIR [--prompts 8 --prompt-len 300 --n 8 --max-new 256]
        [--dtypes float32 bfloat16] [--modes repeated shared] [--rounds 1] [--threads 0] [--json PATH]

Prompts are random token ids, lengths from 0.9 x to 1 x --prompt-len (left padding is exercised).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0); False where the file is not writable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(args: argparse.Namespace) -> dict:
    """One measurement, in this process."""
    import torch

    from lcot_mega.rollout.embedded import EmbeddedEngine
    from lcot_mega.rollout.protocol import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    engine = EmbeddedEngine(args.model_dir, dtype=dtype, share_prompt_kv=args.mode == "shared")
    g = torch.Generator().manual_seed(1)
    lengths = [args.prompt_len - (i * args.prompt_len) // (10 * args.prompts) for i in range(args.prompts)]
    prompts = [torch.randint(3, engine.vocab_size, (n,), generator=g).tolist() for n in lengths]
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=4))
    loaded_hwm, reset = _status_kib("VmHWM"), _reset_peak()
    before_rss = _status_kib("VmRSS")
    params = SamplingParams(max_new_tokens=args.max_new, n=args.n, ignore_eos=True, seed=0)
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = engine.generate(prompts, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    tokens = sum(len(c.token_ids) for cs in out for c in cs)
    return dict(
        mode=args.mode,
        dtype=args.dtype,
        active=engine.share_prompt_kv == (args.mode == "shared"),
        wall_s=wall,
        cpu_s=cpu,
        tok_s=tokens / wall,
        before_generate_rss_mib=before_rss / 1024,
        vm_hwm_mib=max(loaded_hwm, _status_kib("VmHWM")) / 1024,
        generate_peak_mib=_status_kib("VmHWM") / 1024 if reset else None,
        threads=torch.get_num_threads(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--modes", nargs="+", default=["repeated", "shared"])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every (dtype, mode) this many times, interleaved")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    shape = f"{args.prompts} prompts x ~{args.prompt_len} tokens, n={args.n}, {args.max_new} new tokens"
    shape += f", {args.threads or 'default'} threads"
    print(f"{shape}; load average before: {os.getloadavg()}")
    print("| dtype | prompt KV | wall s | CPU s | tok/s | RSS before generate MiB | peak in generate MiB | VmHWM MiB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for dtype, _, mode in itertools.product(args.dtypes, range(args.rounds), args.modes):
        cmd = [sys.executable, __file__, str(args.model_dir), "--one", "--mode", mode, "--dtype", dtype]
        cmd += ["--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len)]
        cmd += ["--n", str(args.n), "--max-new", str(args.max_new), "--threads", str(args.threads)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows.append(r)
        peak = "n/a" if r["generate_peak_mib"] is None else f"{r['generate_peak_mib']:,.0f}"
        print(
            f"| {dtype} | {mode}{'' if r['active'] else ' (fallback)'} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} |"
            f" {r['tok_s']:,.0f} | {r['before_generate_rss_mib']:,.0f} | {peak} | {r['vm_hwm_mib']:,.0f} |",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(dict(shape=shape, rows=rows), indent=1))


if __name__ == "__main__":
    main()
