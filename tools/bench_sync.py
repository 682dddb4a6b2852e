"""Weight-sync throughput: a TP=2 MegatronActor into a rollout engine, in-process and by broadcast, vs. memcpy.

One run, two gloo processes (the actor at TP=2, the cores split between them). Rank 0 also holds the engines:
(1) in-process: an `EmbeddedEngine` loaded bucket by bucket by `sync_weights` (no transport); (2) broadcast: a
`RolloutServer` (an `EmbeddedEngine` served on loopback from a thread of rank 0), reached through an
`SGLangHTTPEngine` client, with `BroadcastSync` broadcasting each bucket over its own gloo group. Each side syncs
`--repeats + 1` times; the first is a warm-up and is excluded, the table shows the median seconds and GB/s
(bytes = tensor bytes pushed into the engine, as `SyncReport` counts them). (3) memcpy: `copy_` of a tensor of
the same number of bytes into another, on rank 0 with the same thread count, median of as many repeats (one
warm-up), as the ceiling a local copy of those bytes reaches on this machine.

Models: `random120m-kv4` (default): a random Llama of SmolLM2-135M's depth and vocabulary but with 4 KV heads so
that it splits at TP=2 (hidden 512, 8 heads of 64, 4 KV heads, FFN 1536, 30 layers, tied 49152-token
embedding, ~120M parameters, fp32), made from a config and saved once under runs/models/; `tiny` (hidden 64,
4 layers). No download.

    python tools/bench_sync.py [--model random120m-kv4|tiny] [--bucket-mb 64] [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_models import prepare_model, progress

from lcot_mega.distributed import free_port, run_local


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


def sync_worker(rank: int, world: int, hf_dir: str, bucket_bytes: int, repeats: int, port: int) -> dict[str, Any]:
    """Both transports on the same TP=2 actor, then memcpy of the synced byte count; rank 0's reports."""
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig
    from lcot_mega.rollout import EmbeddedEngine, RolloutServer, ServeConfig, SGLangHTTPEngine
    from lcot_mega.sync import BroadcastSync, sync_weights

    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    actor = MegatronActor(arch, ActorConfig(tensor_parallel=world), AlgoConfig(), hf_dir)
    out: dict[str, Any] = dict(threads=torch.get_num_threads())
    version = 0

    # (1) in-process: EmbeddedEngine on rank 0, loaded by update_weights
    engines = [EmbeddedEngine(hf_dir)] if rank == 0 else []
    reports = []
    for _ in range(repeats + 1):
        version += 1
        reports.append(sync_weights(actor.chunks, arch, engines, version, bucket_bytes=bucket_bytes))
    out["in_process"] = reports[1:]
    for e in engines:
        e.shutdown()
    del engines
    if rank == 0:
        progress(f"in-process: {[round(r.seconds, 3) for r in reports]} s (first is warm-up)")

    # (2) broadcast: RolloutServer in a thread on rank 0, SGLangHTTPEngine client, BroadcastSync over gloo
    server = clients = transport = None
    if rank == 0:
        server = RolloutServer(EmbeddedEngine(hf_dir), ServeConfig(port=0)).start()
        clients = [SGLangHTTPEngine(server.url)]
        transport = BroadcastSync(clients, "127.0.0.1", port, group_name="bench_sync")
    reports = []
    for _ in range(repeats + 1):
        version += 1
        reports.append(
            sync_weights(actor.chunks, arch, clients or [], version, transport=transport, bucket_bytes=bucket_bytes)
        )
    out["broadcast"] = reports[1:]
    if rank == 0:
        served_version = clients[0].weight_version
        transport.close()
        server.shutdown()
        if served_version != version:
            raise RuntimeError(f"server at weight version {served_version}, expected {version}")
        progress(f"broadcast: {[round(r.seconds, 3) for r in reports]} s (first is warm-up)")

    # (3) memcpy of the same byte count, same process and threads
    if rank == 0:
        out["memcpy"] = memcpy_times(out["in_process"][0].bytes, repeats)
        progress(f"memcpy: {[round(t, 4) for t in out['memcpy']]} s")
    ma.destroy_parallel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("random120m-kv4", "tiny"), default="random120m-kv4")
    ap.add_argument("--bucket-mb", type=float, default=64.0, help="sync bucket size in MiB")
    ap.add_argument("--repeats", type=int, default=3, help="timed syncs per transport (median), after 1 warm-up")
    ap.add_argument("--threads", type=int, default=0, help="cores to use in all (0: this process's affinity)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    cores = args.threads or len(os.sched_getaffinity(0))
    world = 2
    threads = max(1, cores // world)
    bucket_bytes = int(args.bucket_mb * (1 << 20))

    t0 = time.perf_counter()
    hf_dir = prepare_model(args.model)
    n_params = sum(p.numel() for p in _param_shapes(hf_dir))
    progress(f"model {hf_dir}: {n_params / 1e6:.1f}M parameters")
    res = run_local(
        sync_worker, world, str(hf_dir), bucket_bytes, args.repeats, free_port(), threads=threads, timeout_s=1200.0
    )[0]
    elapsed = time.perf_counter() - t0

    nbytes = res["in_process"][0].bytes
    mem_s = statistics.median(res["memcpy"])
    mem_gbs = nbytes / mem_s / 1e9
    rows = []
    for name, key in (
        ("in-process (EmbeddedEngine on rank 0)", "in_process"),
        ("broadcast (RolloutServer thread + SGLangHTTPEngine + BroadcastSync, gloo)", "broadcast"),
    ):
        reps = res[key]
        secs = statistics.median(r.seconds for r in reps)
        gbs = statistics.median(r.gb_per_s for r in reps)
        rows.append(
            f"| {name} | {secs:.3f} | {gbs:.3f} | {reps[0].buckets} | {secs / mem_s:.1f}x | {gbs / mem_gbs:.3f} |"
        )
    rows.append(f"| memcpy (torch `copy_`, same bytes, rank 0) | {mem_s:.5f} | {mem_gbs:.3f} | - | 1.0x | 1.000 |")

    print(
        f"\nmodel {args.model} ({hf_dir}, {n_params / 1e6:.1f}M params), synced {nbytes / 1e9:.3f} GB per sync"
        f" (fp32), bucket {args.bucket_mb:g} MiB, actor TP=2 on {world} gloo procs x {res['threads']} threads"
        f" ({cores} cores in all); median of {args.repeats} syncs after 1 warm-up; torch {torch.__version__}\n"
    )
    print("| transport | seconds (median) | GB/s (median) | buckets | time vs memcpy | GB/s vs memcpy |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ntotal wall time {elapsed:.0f} s")


def _param_shapes(hf_dir: Path) -> list[torch.Size]:
    """Parameter shapes of the saved model (read from the safetensors header, nothing loaded)."""
    from safetensors import safe_open

    shapes = []
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            shapes += [torch.Size(st.get_slice(k).get_shape()) for k in st.keys()]  # noqa: SIM118 (safe_open is not iterable)
    return shapes


if __name__ == "__main__":
    main()
