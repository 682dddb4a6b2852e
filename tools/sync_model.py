"""A MODEL, NOT A MEASUREMENT: weight-sync seconds at 7B, 30B-A3B and 235B on H100 nodes, from the per-byte costs
`bench_sync.py` measured on this box and the hardware's published bandwidths.

Each route's measured cost is taken as a multiple of a memory copy of the same bytes (1 / its `ratio` in the
bench JSON), and that multiple is applied to an H100's device-to-device copy rate; the bytes that cross a link
take bytes / link bandwidth on top. What it leaves out: per-bucket and per-tensor fixed costs (HTTP requests,
kernel launches, the engine's `load_weights` name handling), which dominate at small sizes, and any overlap of
copy and transfer. Read the numbers as lower bounds of this code path's shape, not as predictions.

Routes (bf16 weights, 2 bytes per parameter, one node of 8 GPUs on each side where there are two sides):
- colocated, shard-to-shard: the engine's TP=8 ranks live on the actor's GPUs and each rank copies its own slices
  into its engine's parameters (what `sync_weights` does in process): k_in x (B / 8) / HBM copy rate.
- colocated, SGLang's `/update_weights_from_tensor` (CUDA IPC): the actor's TP group all-gathers full tensors over
  NVLink, and each engine rank loads its slices at the tensor route's measured multiple.
- disaggregated, one broadcast: `BroadcastSync` today, rank 0 sends every byte over one 400 Gb/s NIC.
- disaggregated, shard-to-shard: each of the 8 actor GPUs sends its slices over its own NIC (NeMo-RL's shape; not
  built here: our broadcast has one sender).
- the one-broadcast route with `rollout.sync: delta` at the measured sent fraction (lr 1e-6), plus the encode,
  costed at the measured multiple of a memcpy of the full bf16 bytes (a CPU number; a fused GPU kernel would do
  far better, so this overstates it).

    python tools/sync_model.py [--json docs/bench/sync_2026-12-06.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = {"7B (Qwen2.5-7B, 7.6B)": 7.6e9, "30B-A3B (Qwen3, 30.5B)": 30.5e9, "235B-A22B (Qwen3, 235B)": 235e9}
BYTES_PER_PARAM = 2  # bf16
GPUS = 8
HBM_COPY = 1.5e12  # bytes/s an H100 copies device to device (3.35 TB/s HBM3, each byte read and written)
IB_NIC = 50e9 * 0.9  # bytes/s: one NDR InfiniBand NIC (400 Gb/s) at 90% efficiency
NVLINK = 450e9 * 0.8  # bytes/s into one H100 (NVLink 4, 450 GB/s per direction) at 80% efficiency


def measured_factors(path: Path) -> dict[str, float]:
    """Per route, seconds as a multiple of a memcpy of the same bytes, from one bench_sync run."""
    rows = {r["transport"]: r for r in json.loads(path.read_text())["rows"]}
    memcpy_gbs = rows["memcpy"]["gb_per_s"]
    out = {key: 1.0 / rows[key]["ratio"] for key in ("in_process", "tensor", "broadcast")}
    delta = rows.get("broadcast_delta_1e-06")
    if delta:  # its seconds in memcpys of the full bytes: mostly the encode (CPU shared memory makes the wire cheap)
        out["delta_sent_frac"] = delta["sent_frac"]
        out["delta_encode"] = delta["seconds"] / (delta["full_gb"] / memcpy_gbs)
    return out


def model_rows(factors: dict[str, float]) -> list[tuple[str, list[float]]]:
    """(route, seconds per model) in MODELS' order."""
    sizes = [n * BYTES_PER_PARAM for n in MODELS.values()]
    rows = [
        ("colocated, shard-to-shard (TP=8, in process)", [factors["in_process"] * b / GPUS / HBM_COPY for b in sizes]),
        (
            "colocated, /update_weights_from_tensor (CUDA IPC; TP=8 all-gather over NVLink, each rank loads its slice)",
            [(GPUS - 1) / GPUS * b / NVLINK + factors["tensor"] * b / GPUS / HBM_COPY for b in sizes],
        ),
        ("disaggregated, one broadcast (BroadcastSync, 1 NIC)", [b / IB_NIC for b in sizes]),
        ("disaggregated, shard-to-shard (8 NICs; not built)", [b / GPUS / IB_NIC for b in sizes]),
    ]
    if "delta_sent_frac" in factors:
        f, k = factors["delta_sent_frac"], factors["delta_encode"]
        rows.append(("one broadcast + delta (lr 1e-6)", [f * b / IB_NIC + k * b / GPUS / HBM_COPY for b in sizes]))
    return rows


def format_model(factors: dict[str, float], source: str) -> str:
    lines = [
        f"MODEL, not a measurement (tools/sync_model.py; per-byte factors from {source}: in-process"
        f" {factors['in_process']:.2f}x a memcpy, tensor {factors['tensor']:.2f}x,"
        f" broadcast {factors['broadcast']:.2f}x"
        + (
            f", delta sends {factors['delta_sent_frac']:.1%} of the bytes and costs {factors['delta_encode']:.0f}x"
            " a memcpy of the full bytes on CPU"
            if "delta_sent_frac" in factors
            else ""
        )
        + f"; H100 copy {HBM_COPY / 1e12:.1f} TB/s, NDR NIC {IB_NIC / 1e9:.0f} GB/s; fixed costs excluded):",
        "",
        "| route | " + " | ".join(MODELS) + " |",
        "|---|" + "---|" * len(MODELS),
    ]
    for route, seconds in model_rows(factors):
        lines.append(f"| {route} | " + " | ".join(f"{s:.3g} s" for s in seconds) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=Path("docs/bench/sync_2026-12-06.json"), help="a bench_sync --json")
    args = ap.parse_args()
    print(format_model(measured_factors(args.json), str(args.json)))


if __name__ == "__main__":
    main()
