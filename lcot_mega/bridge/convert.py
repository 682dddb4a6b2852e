"""Hugging Face <-> Megatron dist-checkpoint conversion (`lcot-mega convert`, tools/convert_*.py).

- `hf_to_mcore`: tp * pp * ep processes (spawned here: gloo on CPU, nccl on GPU) each read their slices of the
  HF safetensors (`bridge.hf_load`) and save a model-only checkpoint directory (`megatron_ckpt` layout,
  committed atomically) with the HF config and tokenizer files in its `hf/`, so the reverse needs nothing
  else.
- `mcore_to_hf`: one process loads a checkpoint of any TP/PP into a TP=1 PP=1 model (dist-checkpointing
  reshards on load) and writes an HF directory with `bridge.hf_export.save_hf_checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lcot_mega.checkpoint.store import CheckpointStoreError, verify_checkpoint_dir
from lcot_mega.utils.distributed import free_port, init_process_group

if TYPE_CHECKING:
    from lcot_mega.bridge.arch import ArchSpec

Progress = Callable[[str], None]


class ConversionError(ValueError):
    """A conversion that cannot run as asked; the message says what to change."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(f"output directory {out_dir} exists and is not empty; remove it or pass --overwrite")


# --- HF -> Megatron ----------------------------------------------------------------------------------------


def _check_hf_source(hf_dir: Path, tp: int, pp: int, ep: int = 1) -> None:
    """Fail in the launching process, with the reason, before tp * pp * ep workers start."""
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.bridge.hf_load import safetensors_index

    if tp < 1 or pp < 1 or ep < 1:
        raise ConversionError(f"--tp, --pp and --ep must be >= 1, got tp={tp} pp={pp} ep={ep}")
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    arch = arch_from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    safetensors_index(hf_dir)
    if arch.num_kv_heads % tp or arch.num_heads % tp:
        raise ConversionError(
            f"--tp {tp} must divide the attention heads ({arch.num_heads}) and key/value heads ({arch.num_kv_heads})"
        )
    if arch.num_layers % pp:
        raise ConversionError(f"--pp {pp} must divide the number of layers ({arch.num_layers})")
    if ep > 1 and not arch.num_experts:
        raise ConversionError(f"--ep {ep} needs a mixture-of-experts model; {hf_dir} is dense")
    if ep > 1 and arch.num_experts % ep:
        raise ConversionError(f"--ep {ep} must divide the number of experts ({arch.num_experts})")


def _hf_to_mcore_worker(
    rank: int, world: int, port: int, hf_dir: str, out_dir: str, tp: int, pp: int, ep: int = 1
) -> None:
    import torch.distributed as dist
    from transformers import AutoConfig

    from lcot_mega.actor import checkpoint as megatron_ckpt
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.bridge.hf_load import load_hf_weights
    from lcot_mega.config import ActorConfig

    init_process_group(rank, world, port)
    say = _say if rank == 0 else (lambda msg: None)
    try:
        arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
        moe_tp = tp > 1 and bool(arch.num_experts)  # megatron-core runs a mixture of experts at TP > 1 with SP only
        cfg = ActorConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, sequence_parallel=moe_tp)
        layout = ma.init_parallel(cfg, seed=0)
        chunks = ma.build_model(arch, cfg)
        say(f"hf-to-mcore: [2/3] reading HF weights from {hf_dir} into TP={tp} PP={pp} EP={ep}")
        load_hf_weights(chunks, hf_dir, arch, layout.tp_rank, layout.tp_size, (layout.etp_rank, layout.etp_size))
        say(f"hf-to-mcore: [3/3] writing the dist checkpoint {out_dir}")
        megatron_ckpt.save(chunks, out_dir, 0, extra={"converted_from": hf_dir}, hf_dir=hf_dir)
    finally:
        ma.destroy_parallel()
        dist.destroy_process_group()


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    *,
    ep: int = 1,
    overwrite: bool = False,
    progress: Progress = _say,
) -> Path:
    """Convert an HF model directory into a Megatron dist checkpoint laid out for TP=`tp`, PP=`pp`, EP=`ep` (a
    mixture of experts: each of `ep` ranks writes its share of every layer's experts; any EP loads it back).

    `progress` gets the launcher's messages; the workers' (rank 0) go to stderr.
    """
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    hf_dir, out_dir = Path(hf_dir).resolve(), Path(out_dir).resolve()
    progress(f"hf-to-mcore: [1/3] checking {hf_dir}")
    _check_hf_source(hf_dir, tp, pp, ep)
    _check_out_dir(out_dir, overwrite)
    world = tp * pp * ep
    if torch.cuda.is_available() and world > torch.cuda.device_count():
        raise ConversionError(f"tp * pp * ep = {world} processes need as many GPUs; {torch.cuda.device_count()} found")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    args = (world, free_port(), str(hf_dir), str(out_dir), tp, pp, ep)
    try:
        mp.start_processes(_hf_to_mcore_worker, args=args, nprocs=world, join=True, start_method="spawn")
    except ProcessException as e:
        raise ConversionError(f"hf-to-mcore failed in a worker process:\n{e}") from None
    progress(f"hf-to-mcore: done: {out_dir}")
    return out_dir


# --- Megatron -> HF ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_process_group() -> Iterator[None]:
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("mcore_to_hf runs in one process; call it outside a multi-rank job")
        yield
        return
    init_process_group(0, 1, free_port())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _hf_export():
    try:
        from lcot_mega.bridge import hf_export
    except ImportError as e:
        raise ConversionError(f"lcot_mega.bridge.hf_export is not available in this install ({e})") from e
    return hf_export


def _resolve_source(ckpt_dir: str | Path, hf_config_dir: str | Path | None) -> tuple[Path, dict, Path]:
    from lcot_mega.actor import checkpoint as mc

    path = mc.resolve_checkpoint(ckpt_dir)
    verify_checkpoint_dir(path)
    meta = mc.read_meta(path)
    config_dir = Path(hf_config_dir) if hf_config_dir is not None else path / mc.HF_DIR
    if not (config_dir / "config.json").is_file():
        raise ConversionError(
            f"no HF config.json in {config_dir}: this checkpoint was saved without hf_dir; pass --hf-config DIR"
        )
    return path, meta, config_dir


def _build_arch(arch: ArchSpec, saved: dict, path: Path, config_dir: Path) -> ArchSpec:
    """`arch` with the checkpoint's padded vocabulary (TP padding is trimmed again on export).

    Checked against the checkpoint's recorded shapes before any weight is read, so a config that does not
    belong to the checkpoint fails here, with every difference named.
    """
    expected = {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_heads,
        "num_query_groups": arch.num_kv_heads,
        "kv_channels": arch.head_dim,
        "add_qkv_bias": arch.qkv_bias,
        "qk_layernorm": arch.qk_norm,
        "tied_embeddings": arch.tie_word_embeddings,
    }
    if arch.num_experts or saved.get("num_moe_experts"):
        expected.update(num_moe_experts=arch.num_experts or None, moe_router_topk=arch.experts_per_token)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in expected.items() if saved.get(k) != v]
    padded = saved.get("padded_vocab_size")
    if not isinstance(padded, int) or not arch.vocab_size <= padded < arch.vocab_size + 128:
        diffs.append(f"vocab_size: checkpoint {padded!r} rows (padded for TP), config {arch.vocab_size}")
    if diffs:
        raise ConversionError(f"the HF config in {config_dir} does not match checkpoint {path}: " + "; ".join(diffs))
    return dataclasses.replace(arch, vocab_size=padded)


def mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    hf_config_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress = _say,
) -> Path:
    """Convert a checkpoint (any TP/PP; a dir, or a run's root: its newest valid one) into an HF directory."""
    from transformers import AutoConfig

    from lcot_mega.actor import checkpoint as mc
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig

    out_dir = Path(out_dir)
    progress(f"mcore-to-hf: [1/3] verifying {ckpt_dir}")
    path, meta, config_dir = _resolve_source(ckpt_dir, hf_config_dir)
    _check_out_dir(out_dir, overwrite)
    hf_config = AutoConfig.from_pretrained(config_dir)
    arch = arch_from_hf_config(hf_config)
    build_arch = _build_arch(arch, meta["model"], path, config_dir)
    export = _hf_export()
    tokenizer_files = getattr(export, "TOKENIZER_FILES", ())
    tokenizer_dir = config_dir if any((config_dir / f).is_file() for f in tokenizer_files) else None
    with _single_process_group():
        ma.init_parallel(ActorConfig(), seed=0)
        try:
            chunks = ma.build_model(build_arch, ActorConfig())
            progress(f"mcore-to-hf: [2/3] loading {path} (saved at {_layout_text(meta)}) into TP=1 PP=1")
            mc.load(chunks, path, restore_rng=False)
            progress(f"mcore-to-hf: [3/3] writing {out_dir}")
            export.save_hf_checkpoint(chunks, arch, out_dir, hf_config, tokenizer_dir=tokenizer_dir)
        finally:
            ma.destroy_parallel()
    progress(f"mcore-to-hf: done: {out_dir}")
    return out_dir


def _layout_text(meta: dict) -> str:
    layout = meta.get("layout", {})
    ep = f" EP={layout['ep']}" if layout.get("ep", 1) > 1 else ""
    return f"TP={layout.get('tp')} PP={layout.get('pp')} DP={layout.get('dp')}{ep}, step {meta.get('step')}"


# --- command line ------------------------------------------------------------------------------------------


def add_hf_to_mcore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the checkpoint (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the checkpoint (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size of a mixture of experts (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def add_mcore_to_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory, or a run's checkpoint root (newest valid)")
    p.add_argument("--out", required=True, help="Hugging Face directory to create")
    p.add_argument("--hf-config", default=None, help="HF config/tokenizer dir (default: the checkpoint's hf/)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _run(fn: Callable[[], object], command: str) -> int:
    from lcot_mega.bridge.arch import UnsupportedModelError
    from lcot_mega.bridge.hf_load import CheckpointError

    try:
        fn()
    except (ConversionError, CheckpointStoreError, CheckpointError, UnsupportedModelError) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 1
    return 0


def run_hf_to_mcore(args: argparse.Namespace) -> int:
    return _run(
        lambda: hf_to_mcore(args.hf, args.out, args.tp, args.pp, ep=args.ep, overwrite=args.overwrite), "hf-to-mcore"
    )


def run_mcore_to_hf(args: argparse.Namespace) -> int:
    return _run(
        lambda: mcore_to_hf(args.ckpt, args.out, hf_config_dir=args.hf_config, overwrite=args.overwrite),
        "mcore-to-hf",
    )


def main_hf_to_mcore(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]), description=hf_to_mcore.__doc__)
    add_hf_to_mcore_args(p)
    return run_hf_to_mcore(p.parse_args(argv))


def main_mcore_to_hf(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]), description=mcore_to_hf.__doc__)
    add_mcore_to_hf_args(p)
    return run_mcore_to_hf(p.parse_args(argv))
