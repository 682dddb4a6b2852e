"""Weight-sync throughput: a TP=2 Megatron actor into one rollout engine, per transport, vs. a memory copy.

One run, two gloo processes (the actor at TP=2, the cores split between them). The actor holds weights only (the
megatron-core `GPTModel` chunks loaded from the HF checkpoint, no DDP buffers and no Adam states: the sync reads
parameters only, and a 1B actor with Adam would not fit next to two engines on a 24 GiB box). Rank 0 also drives
the engines:
(1) in-process: an `EmbeddedEngine` on rank 0 loaded bucket by bucket by `sync_weights` (`update_weights`);
(2) broadcast: a `lcot-mega serve` process (an `EmbeddedEngine` behind our SGLang-compatible HTTP server) reached
through an `SGLangHTTPEngine`, with `BroadcastSync` broadcasting each bucket over its own gloo group
(`/init_weights_update_group` + `/update_weights_from_distributed`; one flattened broadcast per bucket);
(3) tensor: the same server through `/update_weights_from_tensor` (SGLang's colocated path): the buckets are
written into a staging buffer in shared memory (`weight_sync.staging`, from the second sync on), handles to each
bucket's range go over HTTP, and the server copies from the mapped segment (flattened bucket, one dtype).
Every sync is followed by the probe check of `rollout.verify_sync`, timed apart from the sync.
Each transport syncs `--repeats + 1` times; the first is a warm-up and is excluded; the table shows the median
seconds and GB/s (bytes = tensor bytes pushed into the engine, as `SyncReport` counts them). (4) memcpy: `copy_` of
a buffer of the same number of bytes into another, on rank 0 with the same thread count, before any model is built
(so its 2x bytes do not add to the peak), median of as many repeats after one warm-up: the ceiling a local copy of
those bytes reaches on this machine. (5) With `--delta-lrs` (default 1e-6 1e-5): a bf16 server, full syncs over
both transports, then delta syncs (`rollout.sync: delta`) each after a simulated step of that learning rate.
(6) The broadcast route's floor on this box, before any model is built: a bare gloo broadcast of the same bytes
in the same buckets from rank 0 to rank 1, which receives into one reused buffer, then the same with rank 1
copying each bucket into a tensor of all the bytes (what a server's load adds at least).

Models (bench_models.py): `random120m-kv4` (default, ~120M parameters, SmolLM2's depth and vocabulary with 4 KV
heads so that TP=2 splits it), `random1b` (a 0.87B Llama: hidden 2048, 16 layers, FFN 5504, 16/8 heads, untied
32000 vocabulary), `tiny`; all fp32, made from a config and saved once under runs/models/. No download.

    python tools/bench_sync.py [--model random120m-kv4|random1b|tiny] [--bucket-mb 64] [--repeats 3] [--threads 0]
        [--json PATH] [--delta-lrs 1e-6 1e-5]

`--json PATH` also writes the table's rows as JSON (read by tools/bench_all.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_models import prepare_model, progress

from lcot_mega.utils.distributed import free_port, run_local

TRANSPORTS = (
    ("in_process_allgather", "in-process, TP shards all-gathered over gloo (the path before shared shards)"),
    ("in_process", "in-process (EmbeddedEngine on rank 0, `update_weights`; TP shards read via shared memory)"),
    ("broadcast", "broadcast (`lcot-mega serve` process, BroadcastSync over gloo)"),
    ("tensor", "update_weights_from_tensor (`lcot-mega serve` process, shared memory)"),
)


def memcpy_times(nbytes: int, repeats: int) -> list[float]:
    """Seconds of `dst.copy_(src)` for two `nbytes`-byte buffers (one untimed warm-up copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 256)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return times


FLOORS = (
    ("gloo_floor", "floor of the broadcast route: gloo broadcast alone, rank 0 -> rank 1, into one reused buffer"),
    ("gloo_floor_copy", "the same floor with the receiver's copy of each bucket into a tensor of all the bytes"),
)


def gloo_floor_times(rank: int, nbytes: int, bucket_bytes: int, repeats: int) -> dict[str, list[float]]:
    """What any broadcast route costs on this box before its own work: rank 0 broadcasts `nbytes` in buckets to
    rank 1 over the default gloo group (TCP loopback), rank 1 receiving into one reused buffer, then the same with
    rank 1 also copying each bucket into a tensor holding all the bytes (as a server loads its parameters).
    Seconds per pass after one warm-up, as rank 0 sees them (a barrier after each pass)."""
    import torch.distributed as dist

    n, b = nbytes // 4, bucket_bytes // 4
    src = torch.ones(n) if rank == 0 else None
    buf, dst = (torch.empty(b), torch.zeros(n)) if rank == 1 else (None, None)  # touched: no faults timed
    out = {}
    for key, copy in (("gloo_floor", False), ("gloo_floor_copy", True)):
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            for start in range(0, n, b):
                k = min(b, n - start)
                if rank == 0:
                    dist.broadcast(src[start : start + k], 0)
                elif rank == 1:
                    dist.broadcast(buf[:k], 0)
                    if copy:
                        dst[start : start + k].copy_(buf[:k])
            dist.barrier()
            times.append(time.perf_counter() - t0)
        out[key] = times[1:]
    return out


def weights_only_actor(hf_dir: str, world: int) -> tuple[list[torch.nn.Module], Any]:
    """This rank's TP=world `GPTModel` chunks with the checkpoint's weights (no DDP, no optimizer)."""
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.bridge.hf_load import load_hf_weights
    from lcot_mega.config import ActorConfig

    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    cfg = ActorConfig(tensor_parallel=world)
    layout = ma.init_parallel(cfg, seed=1)
    chunks = ma.build_model(arch, cfg)
    load_hf_weights(chunks, hf_dir, arch, layout.tp_rank, layout.tp_size)
    return chunks, arch


def start_server(hf_dir: str, threads: int, dtype: str = "float32") -> tuple[subprocess.Popen, Any]:
    """`lcot-mega serve` on a free loopback port, and a client once it answers /health."""
    from lcot_mega.rollout import SGLangHTTPEngine

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "lcot_mega.cli", "serve", hf_dir, "--port", str(port), "--dtype", dtype]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = SGLangHTTPEngine(f"http://127.0.0.1:{port}", timeout_s=600)
    deadline = time.monotonic() + 600
    while not client.health():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"lcot-mega serve did not come up: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)
    return proc, client


def peak_rss_gb(pid: int | None = None) -> float:
    """Peak resident memory (VmHWM) of a process, GB; this process by default."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024 / 1e9


class SyncProfile:
    """Where a sync's seconds go on this rank (the issue-20 breakdown): the TP all-gather, the barriers (around
    reading shared shards, one per bucket where every TP rank writes its slices), the engine's load (in process:
    `update_weights`, name checks and `copy_` into the model; served: the request or broadcast round as the
    trainer waits for it, the server's load included), and the rest (splitting fused tensors, concatenating TP
    slices into the targets, Python). Wraps the functions while it is entered."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list = []

    def _wrap(self, owner: Any, attr: str, key: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def __enter__(self) -> SyncProfile:
        from lcot_mega.bridge import hf_export
        from lcot_mega.rollout.embedded import EmbeddedEngine
        from lcot_mega.rollout.http_client import SGLangHTTPEngine
        from lcot_mega.weight_sync.broadcast import BroadcastSync

        self._wrap(hf_export, "_gather_tp", "tp all-gather")
        self._wrap(hf_export.dist, "barrier", "barriers")  # around reading shared shards, and one per bucket
        self._wrap(EmbeddedEngine, "update_weights", "engine load")
        self._wrap(SGLangHTTPEngine, "update_weights", "engine load")  # the request, as the client waits for it
        self._wrap(BroadcastSync, "_round", "engine load")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)

    def parts(self, total: float) -> dict[str, float]:
        out = dict(self.seconds)
        out["split, concat, python"] = max(total - sum(out.values()), 0.0)
        return out


def simulated_step(chunks: list[torch.nn.Module], lr: float, seed: int) -> None:
    """Move every weight by +-lr (random sign): an Adam step's size early in training (|m/sqrt(v)| = 1), the
    upper bound of how many engine-dtype elements one RL step changes. The bench actor has no optimizer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                p.add_(torch.randint(0, 2, p.shape, generator=g, dtype=p.dtype).mul_(2 * lr).sub_(lr))


def sync_worker(
    rank: int,
    world: int,
    hf_dir: str,
    nbytes: int,
    bucket_bytes: int,
    repeats: int,
    port: int,
    threads: int,
    delta_lrs: tuple[float, ...] = (),
) -> dict[str, Any]:
    """memcpy, then the three transports on the same TP=2 actor, then (with `delta_lrs`) full and delta syncs
    into a bf16 server; rank 0's reports and peak memory."""
    import torch.distributed as dist

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.rollout import EmbeddedEngine
    from lcot_mega.weight_sync import BroadcastSync, ProbeCheck, sync_weights
    from lcot_mega.weight_sync.push import fixed_probe_ids

    out: dict[str, Any] = dict(threads=torch.get_num_threads())
    if rank == 0:  # before any model exists, so that its two buffers do not add to the peak
        out["memcpy"] = memcpy_times(nbytes, repeats)
        progress(f"memcpy: {[round(t, 4) for t in out['memcpy']]} s")
        gc.collect()
    dist.barrier()
    out.update(gloo_floor_times(rank, nbytes, bucket_bytes, repeats))  # also before the model, for the peak
    if rank == 0:
        progress(f"gloo floor: {[round(t, 4) for t in out['gloo_floor']]} s")
    gc.collect()
    chunks, arch = weights_only_actor(hf_dir, world)
    version = 0

    def run(key: str, engines: list, transport: Any = None, shared: bool = True, delta: Any = None,
            lr: float = 0.0, dtype: Any = None) -> None:  # fmt: skip
        nonlocal version
        reports, parts, checks = [], [], []
        for _ in range(repeats + 1):
            version += 1
            if lr:  # untimed: the step the sync follows
                simulated_step(chunks, lr, seed=1000 * version + rank)
            with SyncProfile() as prof:
                kw = dict(bucket_bytes=bucket_bytes, transport=transport, shared=shared, delta=delta)
                probe = ProbeCheck(fixed_probe_ids(arch.vocab_size), 1e-3 if dtype is None else 1.0)
                kw.update(engine_dtype=dtype, verify=probe)  # as `rollout.verify_sync` does by default
                t0 = time.perf_counter()
                reports.append(sync_weights(chunks, arch, engines, version, **kw))
                checks.append(time.perf_counter() - t0 - reports[-1].seconds)
            parts.append(prof.parts(reports[-1].seconds))
        out[key], out[f"{key}_parts"], out[f"{key}_verify_s"] = reports[1:], parts[1:], checks[1:]
        if rank == 0:
            progress(f"{key}: {[round(r.seconds, 3) for r in reports]} s (first is warm-up)")

    engines = [EmbeddedEngine(hf_dir)] if rank == 0 else []
    run("in_process_allgather", engines, shared=False)
    run("in_process", engines)
    for e in engines:
        e.shutdown()
    del engines
    gc.collect()

    proc = client = transport = None
    if rank == 0:
        proc, client = start_server(hf_dir, threads)
        transport = BroadcastSync([client], "127.0.0.1", port, group_name="bench_sync")
    run("broadcast", [client] if client else [], transport)
    if rank == 0:
        transport.close()
    run("tensor", [client] if client else [])
    if rank == 0:
        served_version = client.weight_version
        out["server_peak_rss_gb"] = peak_rss_gb(proc.pid)
        proc.terminate()
        proc.wait(timeout=60)
        if served_version != version:
            raise RuntimeError(f"server at weight version {served_version}, expected {version}")
    if delta_lrs:
        version = delta_rows(run, hf_dir, threads, port, rank, delta_lrs, version, out)
    out["peak_rss_gb"] = peak_rss_gb()
    ma.destroy_parallel()
    return out


def delta_rows(
    run: Any, hf_dir: str, threads: int, port: int, rank: int, lrs: tuple[float, ...], version: int, out: dict
) -> int:
    """`rollout.sync: delta` against full syncs, into a bf16 `lcot-mega serve` (the dtype where deltas pay), over
    both served transports; each delta row follows `simulated_step`s of one learning rate. Its warm-up sync is
    full (no baseline yet) and excluded like every warm-up."""
    from lcot_mega.weight_sync import BroadcastSync
    from lcot_mega.weight_sync.delta import DeltaEncoder

    proc = client = transport = None
    if rank == 0:
        proc, client = start_server(hf_dir, threads, dtype="bfloat16")
        transport = BroadcastSync([client], "127.0.0.1", port, group_name="bench_sync_delta")
    engines = [client] if client else []
    bf16 = torch.bfloat16  # sent as the engine holds them: half the actor's fp32 bytes
    run("tensor_bf16", engines, dtype=bf16)
    run("broadcast_bf16", engines, transport, dtype=bf16)
    for lr in lrs:
        run(f"tensor_delta_{lr:g}", engines, delta=DeltaEncoder(bf16), lr=lr, dtype=bf16)
        run(f"broadcast_delta_{lr:g}", engines, transport, delta=DeltaEncoder(bf16), lr=lr, dtype=bf16)
    if rank == 0:
        transport.close()
        out["server_bf16_peak_rss_gb"] = peak_rss_gb(proc.pid)
        proc.terminate()
        proc.wait(timeout=60)
    out["delta_keys"] = ["tensor_bf16", "broadcast_bf16"] + [
        f"{t}_delta_{lr:g}" for lr in lrs for t in ("tensor", "broadcast")
    ]
    return version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("random120m-kv4", "random1b", "tiny"), default="random120m-kv4")
    ap.add_argument("--bucket-mb", type=float, default=64.0, help="sync bucket size in MiB")
    ap.add_argument("--repeats", type=int, default=3, help="timed syncs per transport (median), after 1 warm-up")
    ap.add_argument("--threads", type=int, default=0, help="cores to use in all (0: this process's affinity)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    lrs_help = "learning rates of the simulated steps before delta syncs (none: skip the bf16 rows)"
    ap.add_argument("--delta-lrs", type=float, nargs="*", default=[1e-6, 1e-5], help=lrs_help)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    cores = args.threads or len(os.sched_getaffinity(0))
    world = 2
    threads = max(1, cores // world)
    bucket_bytes = int(args.bucket_mb * (1 << 20))

    t0 = time.perf_counter()
    hf_dir = prepare_model(args.model)
    n_params, nbytes = _param_counts(hf_dir)
    progress(f"model {hf_dir}: {n_params / 1e6:.1f}M parameters, {nbytes / 1e9:.3f} GB")
    res = run_local(
        sync_worker,
        world,
        str(hf_dir),
        nbytes,
        bucket_bytes,
        args.repeats,
        free_port(),
        threads,
        tuple(args.delta_lrs),
        threads=threads,
        timeout_s=3600.0,
    )
    elapsed = time.perf_counter() - t0
    synced = res[0]["in_process"][0].bytes
    if synced != nbytes:  # memcpy copied the checkpoint's byte count: say so if the sync moved another
        progress(f"note: a sync moves {synced} bytes, the checkpoint holds {nbytes} (memcpy used the latter)")
    print(format_table(args, hf_dir, n_params, nbytes, res, world, cores, elapsed))
    if args.json:
        meta = dict(model=args.model, params=n_params, bytes=nbytes, bucket_mb=args.bucket_mb, repeats=args.repeats)
        meta.update(procs=world, threads=res[0]["threads"], cores=cores, seconds=elapsed)
        args.json.write_text(json.dumps(dict(meta=meta, rows=json_rows(nbytes, res[0])), indent=1))


def json_rows(nbytes: int, rank0: dict) -> list[dict[str, Any]]:
    """The table's rows as numbers: medians per transport, then the memcpy row (ratios against it)."""
    mem_s = statistics.median(rank0["memcpy"])
    mem_gbs = nbytes / mem_s / 1e9
    rows = []
    for key, name in TRANSPORTS:
        reps = rank0[key]
        gbs = statistics.median(r.gb_per_s for r in reps)
        secs = statistics.median(r.seconds for r in reps)
        rows.append(dict(transport=key, name=name, seconds=secs, gb_per_s=gbs, buckets=reps[0].buckets))
        parts = rank0[f"{key}_parts"]
        breakdown = {part: statistics.median(p.get(part, 0.0) for p in parts) for part in parts[0]}
        verify_s = statistics.median(rank0[f"{key}_verify_s"])
        rows[-1].update(ratio=gbs / mem_gbs, breakdown_s=breakdown, verify_s=verify_s)
    for key, name in FLOORS if "gloo_floor" in rank0 else ():
        secs = statistics.median(rank0[key])
        rows.append(dict(transport=key, name=name, seconds=secs, gb_per_s=nbytes / secs / 1e9, buckets=0))
        rows[-1]["ratio"] = rows[-1]["gb_per_s"] / mem_gbs
    rows.append(dict(transport="memcpy", name="memcpy (torch `copy_`, same bytes, rank 0)", seconds=mem_s))
    rows[-1].update(gb_per_s=mem_gbs, buckets=0, ratio=1.0)
    return rows + [dict(transport=key, **delta_row(rank0[key], mem_gbs)) for key in rank0.get("delta_keys", [])]


def delta_row(reps: list, mem_gbs: float) -> dict[str, float]:
    """Medians of one bf16 row: seconds, bytes sent, the full sync's bytes, and the effective rate (full bytes per
    second, the rate a full sync would need to match) against memcpy."""
    secs = statistics.median(r.seconds for r in reps)
    full = statistics.median(r.delta.full_bytes if r.delta else r.bytes for r in reps)
    sent = statistics.median(r.bytes for r in reps)
    changed = statistics.median(r.delta.changed / r.delta.elements if r.delta else 1.0 for r in reps)
    fallbacks = sum(bool(r.delta_fallback) for r in reps)
    gbs = full / secs / 1e9
    return dict(seconds=secs, sent_gb=sent / 1e9, full_gb=full / 1e9, sent_frac=sent / full, changed_frac=changed,
                effective_gb_per_s=gbs, ratio=gbs / mem_gbs, fallbacks=fallbacks)  # fmt: skip


def format_delta_table(rank0: dict, mem_gbs: float) -> list[str]:
    if not rank0.get("delta_keys"):
        return []
    lines = [
        "",
        "bf16 server, full vs `rollout.sync: delta` after simulated steps (every weight +-lr); effective GB/s ="
        " the full sync's bytes / seconds:",
        "",
        "| row | seconds | GB sent | sent / full | elements changed | effective GB/s | vs memcpy | fallbacks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in rank0["delta_keys"]:
        r = delta_row(rank0[key], mem_gbs)
        lines.append(
            f"| {key} | {r['seconds']:.3f} | {r['sent_gb']:.4f} | {r['sent_frac']:.3f} | {r['changed_frac']:.4f} |"
            f" {r['effective_gb_per_s']:.3f} | {r['ratio']:.3f} | {r['fallbacks']} |"
        )
    return lines


def format_table(
    args: argparse.Namespace,
    hf_dir: Path,
    n_params: int,
    nbytes: int,
    res: list[dict],
    world: int,
    cores: int,
    elapsed: float,
) -> str:
    rank0 = res[0]
    mem_s = statistics.median(rank0["memcpy"])
    mem_gbs = nbytes / mem_s / 1e9
    lines = [
        f"\nmodel {args.model} ({hf_dir}, {n_params / 1e6:.1f}M params), synced {nbytes / 1e9:.3f} GB per sync (fp32),"
        f" bucket {args.bucket_mb:g} MiB, actor TP=2 (weights only) on {world} gloo procs x {rank0['threads']} threads"
        f" ({cores} cores in all); median of {args.repeats} syncs after 1 warm-up; torch {torch.__version__}\n",
        "| transport | seconds (median) | GB/s (median) | buckets | time vs memcpy | GB/s vs memcpy |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in TRANSPORTS:
        reps = rank0[key]
        secs = statistics.median(r.seconds for r in reps)
        gbs = statistics.median(r.gb_per_s for r in reps)
        lines.append(
            f"| {name} | {secs:.3f} | {gbs:.3f} | {reps[0].buckets} | {secs / mem_s:.1f}x | {gbs / mem_gbs:.3f} |"
        )
    for key, name in FLOORS:
        secs = statistics.median(rank0[key])
        gbs = nbytes / secs / 1e9
        lines.append(f"| {name} | {secs:.3f} | {gbs:.3f} | - | {secs / mem_s:.1f}x | {gbs / mem_gbs:.3f} |")
    lines.append(f"| memcpy (torch `copy_`, same bytes, rank 0) | {mem_s:.5f} | {mem_gbs:.3f} | - | 1.0x | 1.000 |")
    lines += ["", "Where the seconds go (rank 0, median per part; the probe check comes after the sync's seconds):", ""]
    parts = ["tp all-gather", "barriers", "engine load", "split, concat, python"]
    head = [*parts, "probe check (`rollout.verify_sync`)"]
    lines += ["| transport | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for key, name in TRANSPORTS:
        cells = [f"{statistics.median(p.get(part, 0.0) for p in rank0[f'{key}_parts']):.3f}" for part in parts]
        cells.append(f"{statistics.median(rank0[f'{key}_verify_s']):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += format_delta_table(rank0, mem_gbs)
    rss = " + ".join(f"{r['peak_rss_gb']:.2f}" for r in res)
    lines.append(
        f"\npeak RSS GB: actor ranks {rss} (rank 0 includes the in-process engine), server"
        f" {rank0['server_peak_rss_gb']:.2f}; total wall time {elapsed:.0f} s"
    )
    return "\n".join(lines)


def _param_counts(hf_dir: Path) -> tuple[int, int]:
    """Parameters and tensor bytes of the saved model (read from the safetensors headers, nothing loaded)."""
    from safetensors import safe_open

    n = nbytes = 0
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = st.get_slice(k)
                numel = torch.Size(sl.get_shape()).numel()
                n += numel
                nbytes += numel * torch.empty(0, dtype=_DTYPES[sl.get_dtype()]).element_size()
    return n, nbytes


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


if __name__ == "__main__":
    main()
