"""Megatron-core -> HF export: bit-exact round trips in every layout, buckets, pipeline collect, atomic writes.

One gloo launch (2 processes) covers TP=2, PP=2 and DP=2 one after the other (the parallel state is rebuilt
between them); the tests below each check one behaviour of its results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import hf_logits, make_tiny_hf
from safetensors.torch import load_file

from lcot_mega.bridge.arch import arch_from_hf_config
from lcot_mega.bridge.mapping import hf_tensor_names

pytest.importorskip("megatron.core")

MODELS = {"llama": ("llama", {}), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {"tie": True})}
MODELS["vocab97"] = ("llama", {"vocab_size": 97})  # not divisible by TP=2: embedding and lm_head padded on load
SMALL_SHARD = 200_000  # bytes: the tiny llama (about 0.7 MB) is written as several shards
BUCKET = 20_000  # bytes: some tensors (embedding, gate/up/down) are larger and form buckets alone
INPUT_IDS = torch.tensor([[5, 17, 3, 88, 42, 7, 61, 0, 95, 23, 11, 70]])


def _read_hf(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    hf_dir = Path(hf_dir)
    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# ------------------------------------------------------------------------------------ in the workers


def _load(name: str, hf_dir: str, cfg, layout):
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.hf_load import load_hf_weights

    hf_config = AutoConfig.from_pretrained(hf_dir)
    arch = arch_from_hf_config(hf_config)
    chunks = ma.build_model(arch, cfg)
    load_hf_weights(chunks, hf_dir, arch, layout.tp_rank, layout.tp_size)
    return chunks, arch, hf_config


def _save_all(dirs: dict[str, str], out: Path, cfg, layout) -> dict[str, str | None]:
    from lcot_mega.bridge.hf_export import save_hf_checkpoint

    saved = {}
    for name, hf_dir in dirs.items():
        chunks, arch, hf_config = _load(name, hf_dir, cfg, layout)
        path = save_hf_checkpoint(chunks, arch, out / name, hf_config, bucket_bytes=BUCKET)
        saved[name] = None if path is None else str(path)
    return saved


def _gathered(chunks, arch, dst: int) -> list[tuple[str, torch.Tensor]]:
    from lcot_mega.bridge.hf_export import gather_hf_state

    return [item for bucket in gather_hf_state(chunks, arch, BUCKET, dst=dst) for item in bucket]


def _failing_saves(chunks, arch, hf_config, out: Path) -> dict:
    """Saves whose shard writer fails after the first shard: into a new dir and over an existing one."""
    from lcot_mega.bridge import hf_export

    writes = []

    def write_then_fail(path, tensors):
        if writes:
            raise OSError("disk full")
        writes.append(path)
        hf_export.save_file(tensors, str(path))

    real, hf_export._write_shard = hf_export._write_shard, write_then_fail
    (out / "existing").mkdir(parents=True, exist_ok=True)
    (out / "existing" / "keep.txt").write_text("previous export")
    errors = []
    try:
        for target in ("new", "existing"):
            writes.clear()
            try:
                hf_export.save_hf_checkpoint(
                    chunks, arch, out / target, hf_config, bucket_bytes=BUCKET, max_shard_bytes=SMALL_SHARD
                )
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
    finally:
        hf_export._write_shard = real
    torch.distributed.barrier()
    return {"errors": errors, "listing": sorted(os.listdir(out))}


def _wrap_ddp(chunks):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True)
    return [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c) for c in chunks]


def _tp2_phase(rank: int, dirs: dict[str, str], out: Path) -> dict:
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.hf_export import iter_hf_buckets, iter_hf_tensors, save_hf_checkpoint
    from lcot_mega.config import ActorConfig

    cfg = ActorConfig(tensor_parallel=2)
    layout = ma.init_parallel(cfg, seed=1)
    others = {k: v for k, v in _models_only(dirs).items() if k != "llama"}
    res = {"saved": _save_all(others, out / "tp2", cfg, layout)}
    # llama: several shards, a tokenizer, progress reports
    chunks, arch, hf_config = _load("llama", dirs["llama"], cfg, layout)
    calls = []
    path = save_hf_checkpoint(
        chunks,
        arch,
        out / "tp2" / "llama",
        hf_config,
        tokenizer_dir=dirs["tokenizer"],
        bucket_bytes=BUCKET,
        max_shard_bytes=SMALL_SHARD,
        progress=lambda done, total: calls.append((done, total)),
    )
    res["saved"]["llama"] = None if path is None else str(path)
    res["progress"] = calls
    tensors = list(iter_hf_tensors(chunks, arch))
    res["tensors"] = tensors
    res["buckets"] = list(iter_hf_buckets(chunks, arch, BUCKET))
    save_hf_checkpoint(chunks, arch, out / "tp2-bf16" / "llama", hf_config, dtype=torch.bfloat16)
    res["through_ddp"] = list(iter_hf_tensors(_wrap_ddp(chunks), arch))
    res["failing"] = _failing_saves(chunks, arch, hf_config, out / "failing")
    ma.destroy_parallel()
    return res


def _pp2_phase(rank: int, dirs: dict[str, str], out: Path) -> dict:
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.hf_export import iter_hf_tensors
    from lcot_mega.config import ActorConfig

    cfg = ActorConfig(pipeline_parallel=2)
    layout = ma.init_parallel(cfg, seed=1)
    res = {"saved": _save_all(_models_only(dirs), out / "pp2", cfg, layout)}
    chunks, arch, _ = _load("qwen3", dirs["qwen3"], cfg, layout)
    res["stage_names"] = [name for name, _ in iter_hf_tensors(chunks, arch)]
    res["gathered"] = _gathered(chunks, arch, dst=1)
    ma.destroy_parallel()
    return res


def _dp2_phase(rank: int, dirs: dict[str, str]) -> dict:
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.config import ActorConfig

    cfg = ActorConfig()
    layout = ma.init_parallel(cfg, seed=1)
    chunks, arch, _ = _load("qwen2", dirs["qwen2"], cfg, layout)
    res = {"dst1": _gathered(chunks, arch, dst=1), "dst0": [n for n, _ in _gathered(chunks, arch, dst=0)]}
    ma.destroy_parallel()
    return res


def _models_only(dirs: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in dirs.items() if k in MODELS}


def _export_worker(rank: int, world: int, dirs: dict[str, str], out: str) -> dict:
    out = Path(out)
    return {"tp2": _tp2_phase(rank, dirs, out), "pp2": _pp2_phase(rank, dirs, out), "dp2": _dp2_phase(rank, dirs)}


def _tp2pp2_worker(rank: int, world: int, dirs: dict[str, str], out: str) -> dict:
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.config import ActorConfig

    cfg = ActorConfig(tensor_parallel=2, pipeline_parallel=2)
    res = {"saved": _save_all(dirs, Path(out) / "tp2pp2", cfg, ma.init_parallel(cfg, seed=1))}
    ma.destroy_parallel()
    cfg = ActorConfig(pipeline_parallel=2)  # and DP=2: collect on rank 3 (stage 1 of data-parallel replica 1)
    chunks, arch, _ = _load("llama", dirs["llama"], cfg, ma.init_parallel(cfg, seed=1))
    res["gathered"] = _gathered(chunks, arch, dst=3)
    ma.destroy_parallel()
    return res


# ------------------------------------------------------------------------------------- in the tests


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    dirs = {name: str(make_tiny_hf(root / name, family, **kw)) for name, (family, kw) in MODELS.items()}
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (tokenizer / "chat_template.jinja").write_text("{{ messages }}")
    dirs["tokenizer"] = str(tokenizer)
    return dirs


@pytest.fixture(scope="module")
def export(hf_dirs, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("export")
    return out, run_gloo(_export_worker, 2, hf_dirs, str(out))


def _assert_same_tensors(saved_dir: str | Path, original_dir: str | Path) -> None:
    saved, original = _read_hf(saved_dir), _read_hf(original_dir)
    assert sorted(saved) == sorted(original)
    for name, t in original.items():
        assert saved[name].dtype == t.dtype and torch.equal(saved[name], t), name


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_round_trip_is_bit_exact(export, hf_dirs, layout):
    out, per_rank = export
    assert per_rank[1][layout]["saved"] == dict.fromkeys(MODELS)  # only global rank 0 writes
    for name in MODELS:
        assert per_rank[0][layout]["saved"][name] == str(out / layout / name)
        _assert_same_tensors(out / layout / name, hf_dirs[name])  # vocab97: load pads, export trims


def test_tied_export_has_no_lm_head_and_loads_with_the_same_logits(export, hf_dirs):
    out, _ = export
    assert "lm_head.weight" not in _read_hf(out / "pp2" / "qwen3")
    for name in MODELS:
        assert torch.equal(hf_logits(out / "pp2" / name, INPUT_IDS), hf_logits(hf_dirs[name], INPUT_IDS)), name


def test_large_export_is_sharded_with_an_index_and_tokenizer_files(export, hf_dirs):
    out, per_rank = export
    llama = out / "tp2" / "llama"
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    shards = sorted(llama.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (llama / "model.safetensors").exists()
    assert {llama / f for f in index["weight_map"].values()} == set(shards)
    for shard in shards:  # at most SMALL_SHARD bytes each, unless a single tensor is larger
        tensors = load_file(shard)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= SMALL_SHARD
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _read_hf(hf_dirs["llama"]).values())
    assert (llama / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (llama / "tokenizer_config.json").is_file() and (llama / "config.json").is_file()
    assert [p.name for p in (out / "tp2" / "qwen2").glob("*.safetensors")] == ["model.safetensors"]
    total = len(_read_hf(hf_dirs["llama"]))
    assert per_rank[0]["tp2"]["progress"] == [(i, total) for i in range(1, total + 1)]
    assert per_rank[1]["tp2"]["progress"] == []


def test_dtype_casts_the_saved_tensors_and_the_config(export, hf_dirs):
    out, _ = export
    saved, original = _read_hf(out / "tp2-bf16" / "llama"), _read_hf(hf_dirs["llama"])
    assert all(torch.equal(saved[n], t.to(torch.bfloat16)) for n, t in original.items())
    assert json.loads((out / "tp2-bf16" / "llama" / "config.json").read_text())["dtype"] == "bfloat16"


def test_buckets_respect_the_size_limit_and_hold_every_tensor_once(export, hf_dirs):
    _, per_rank = export
    original = _read_hf(hf_dirs["llama"])
    for res in (r["tp2"] for r in per_rank):  # every TP rank gets the full tensors
        assert [n for n, _ in res["tensors"]] == [n for bucket in res["buckets"] for n, _ in bucket]
        assert any(len(b) == 1 and b[0][1].numel() * 4 > BUCKET for b in res["buckets"])
        for bucket in res["buckets"]:
            assert len(bucket) == 1 or sum(t.numel() * t.element_size() for _, t in bucket) <= BUCKET
        assert sorted(n for n, _ in res["tensors"]) == sorted(original)
        for name, t in res["tensors"]:
            assert torch.equal(t, original[name]), name


def test_export_through_the_ddp_wrapper_is_the_same(export):
    _, per_rank = export
    for res in (r["tp2"] for r in per_rank):
        assert [n for n, _ in res["through_ddp"]] == [n for n, _ in res["tensors"]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(res["through_ddp"], res["tensors"], strict=True))


def test_pipeline_collect_streams_stage_0_then_stage_1_to_dst_only(export, hf_dirs):
    _, per_rank = export
    assert per_rank[0]["pp2"]["gathered"] == []
    gathered = per_rank[1]["pp2"]["gathered"]
    assert [n for n, _ in gathered] == per_rank[0]["pp2"]["stage_names"] + per_rank[1]["pp2"]["stage_names"]
    assert "model.layers.3.mlp.down_proj.weight" in per_rank[1]["pp2"]["stage_names"]  # global layer index
    original = _read_hf(hf_dirs["qwen3"])
    assert sorted(n for n, _ in gathered) == sorted(original)
    for name, t in gathered:
        assert torch.equal(t, original[name]), name


def test_data_parallel_replicas_collect_only_on_dst(export, hf_dirs):
    _, per_rank = export
    assert per_rank[0]["dp2"]["dst1"] == [] and per_rank[1]["dp2"]["dst0"] == []
    assert [n for n, _ in per_rank[1]["dp2"]["dst1"]] == per_rank[0]["dp2"]["dst0"]
    original = _read_hf(hf_dirs["qwen2"])
    assert {n: t for n, t in per_rank[1]["dp2"]["dst1"]}.keys() == original.keys()
    for name, t in per_rank[1]["dp2"]["dst1"]:
        assert torch.equal(t, original[name]), name


def test_failed_write_leaves_no_partial_directory(export):
    out, per_rank = export
    failing = per_rank[0]["tp2"]["failing"]
    assert failing["errors"] == ["OSError: disk full"] * 2
    assert per_rank[1]["tp2"]["failing"]["errors"] == [
        f"HFExportError: rank 0 failed to write {out / 'failing' / t}: OSError: disk full" for t in ("new", "existing")
    ]
    assert failing["listing"] == ["existing"]  # no "new", no temporary sibling left behind
    assert os.listdir(out / "failing" / "existing") == ["keep.txt"]


def test_hf_tensor_names_are_the_transformers_checkpoint_keys(hf_dirs):
    for name in MODELS:
        arch = arch_from_hf_config(json.loads((Path(hf_dirs[name]) / "config.json").read_text()))
        assert sorted(hf_tensor_names(arch)) == sorted(_read_hf(hf_dirs[name])), name


@pytest.mark.slow
def test_round_trip_at_tp2_pp2_and_collect_on_another_replica(hf_dirs, tmp_path):
    models = _models_only(hf_dirs)
    per_rank = run_gloo(_tp2pp2_worker, 4, models, str(tmp_path))
    assert [r["saved"] for r in per_rank[1:]] == [dict.fromkeys(models)] * 3
    for name in models:
        _assert_same_tensors(per_rank[0]["saved"][name], hf_dirs[name])
    assert [r["gathered"] for r in per_rank[:3]] == [[], [], []]
    original = _read_hf(hf_dirs["llama"])
    gathered = dict(per_rank[3]["gathered"])
    assert gathered.keys() == original.keys() and all(torch.equal(gathered[n], t) for n, t in original.items())
