"""HF -> Megatron (TP=2) -> HF gives the same transformers logits; bad inputs fail with a clear message."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import hf_logits, make_tiny_hf

from lcot_mega.bridge import convert
from lcot_mega.checkpoint.store import CorruptCheckpointError, NoCheckpointError

pytest.importorskip("megatron.core")

TOOLS = Path(__file__).resolve().parents[2] / "tools"
INPUT_IDS = torch.tensor([[5, 17, 3, 88, 42, 7, 61, 0, 96, 23, 11, 70]])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tied Qwen3 with an odd vocabulary (97 rows: padded to 98 at TP=2), converted at TP=2."""
    root = tmp_path_factory.mktemp("convert")
    hf = make_tiny_hf(root / "hf", "qwen3", tie=True, vocab_size=97)
    messages: list[str] = []
    ckpt = convert.hf_to_mcore(hf, root / "ckpt", tp=2, progress=messages.append)
    assert messages[-1] == f"hf-to-mcore: done: {ckpt}"
    return hf, ckpt


def test_hf_to_mcore_writes_a_self_contained_checkpoint(converted):
    hf, ckpt = converted
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["step"], meta["layout"]["tp"], meta["model"]["padded_vocab_size"]) == (0, 2, 98)
    assert (ckpt / "hf" / "config.json").is_file()
    assert (ckpt / "COMPLETE").is_file()
    assert not list(ckpt.parent.glob(".tmp-*"))
    with pytest.raises(convert.ConversionError, match="exists and is not empty"):
        convert.hf_to_mcore(hf, ckpt, tp=2)


def test_round_trip_through_the_cli_gives_identical_logits(converted, tmp_path):
    if importlib.util.find_spec("lcot_mega.bridge.hf_export") is None:
        pytest.skip("lcot_mega.bridge.hf_export has not landed yet")
    hf, ckpt = converted
    out = tmp_path / "hf_out"
    cmd = [sys.executable, "-m", "lcot_mega.cli", "convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mcore-to-hf: [2/3] loading" in proc.stderr and "TP=2 PP=1 DP=1" in proc.stderr
    assert torch.equal(hf_logits(out, INPUT_IDS), hf_logits(hf, INPUT_IDS))


def test_missing_or_partial_checkpoint_is_named(tmp_path, capsys):
    with pytest.raises(NoCheckpointError, match="does not exist"):
        convert.mcore_to_hf(tmp_path / "nowhere", tmp_path / "out", progress=lambda m: None)
    partial = tmp_path / "partial"
    (partial / "model").mkdir(parents=True)
    (partial / "meta.json").write_text("{}")
    with pytest.raises(CorruptCheckpointError, match="no COMPLETE marker"):
        convert.mcore_to_hf(partial, tmp_path / "out", progress=lambda m: None)
    rc = convert.main_mcore_to_hf(["--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert rc == 1
    assert "mcore-to-hf: error: checkpoint path" in capsys.readouterr().err


def test_damaged_checkpoint_and_foreign_config_fail_before_loading(converted, tmp_path):
    _, ckpt = converted
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    shard = next((damaged / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match=r"distcp has \d+ bytes"):
        convert.mcore_to_hf(damaged, tmp_path / "out", progress=lambda m: None)

    other = make_tiny_hf(tmp_path / "other", "qwen3", tie=True, vocab_size=97, hidden_size=32, intermediate_size=56)
    with pytest.raises(convert.ConversionError, match="hidden_size: checkpoint 64, config 32"):
        convert.mcore_to_hf(ckpt, tmp_path / "out", hf_config_dir=other, progress=lambda m: None)


def test_hf_source_problems_are_reported_before_spawning(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "llama")
    with pytest.raises(convert.ConversionError, match="--tp 3 must divide"):
        convert.hf_to_mcore(hf, tmp_path / "out", tp=3, progress=lambda m: None)
    with pytest.raises(convert.ConversionError, match="--pp 3 must divide the number of layers"):
        convert.hf_to_mcore(hf, tmp_path / "out", pp=3, progress=lambda m: None)
    with pytest.raises(convert.ConversionError, match=r"no config\.json"):
        convert.hf_to_mcore(tmp_path, tmp_path / "out", progress=lambda m: None)


@pytest.mark.slow
def test_tp2_pp2_round_trip_untied(tmp_path):
    if importlib.util.find_spec("lcot_mega.bridge.hf_export") is None:
        pytest.skip("lcot_mega.bridge.hf_export has not landed yet")
    hf = make_tiny_hf(tmp_path / "hf", "qwen2")
    cmd = [sys.executable, str(TOOLS / "convert_hf_to_mcore.py"), "--hf", str(hf), "--out", str(tmp_path / "ckpt")]
    proc = subprocess.run([*cmd, "--tp", "2", "--pp", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [
        sys.executable,
        str(TOOLS / "convert_mcore_to_hf.py"),
        "--ckpt",
        str(tmp_path / "ckpt"),
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(hf_logits(tmp_path / "out", INPUT_IDS % 96), hf_logits(hf, INPUT_IDS % 96))


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, initializer_range=0.2)


@pytest.mark.parametrize(("tp", "ep"), [(1, 2), (2, 1)], ids=["ep2", "tp2"])
def test_moe_round_trip_at_ep2_or_tp2_is_bit_exact(tmp_path, tp, ep):
    """Qwen3-MoE HF -> Megatron at EP=2 (each of two ranks writes half of every layer's experts) or TP=2 (each
    expert split over the ranks) -> HF at EP=1 TP=1 (dist-checkpointing reshards on load): every tensor back bit
    for bit, and the same logits."""
    from safetensors.torch import load_file

    hf = make_tiny_hf(tmp_path / "hf", "qwen3_moe", **MOE)
    ckpt = convert.hf_to_mcore(hf, tmp_path / "ckpt", tp=tp, ep=ep, progress=lambda m: None)
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    assert (meta["layout"]["ep"], meta["layout"]["tp"]) == (ep, tp) and meta["model"]["num_moe_experts"] == 4
    messages: list[str] = []
    out = convert.mcore_to_hf(ckpt, tmp_path / "out", progress=messages.append)
    assert any(f"TP={tp}" in m for m in messages)
    want, got = load_file(f"{hf}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert torch.equal(hf_logits(out, INPUT_IDS % 96), hf_logits(hf, INPUT_IDS % 96))


def test_expert_parallel_conversions_that_cannot_work_are_refused(tmp_path):
    dense = make_tiny_hf(tmp_path / "dense", "qwen3")
    with pytest.raises(convert.ConversionError, match="--ep 2 needs a mixture-of-experts model"):
        convert.hf_to_mcore(dense, tmp_path / "out", ep=2, progress=lambda m: None)
    moe = make_tiny_hf(tmp_path / "moe", "qwen3_moe", **MOE)
    with pytest.raises(convert.ConversionError, match=r"--ep 3 must divide the number of experts \(4\)"):
        convert.hf_to_mcore(moe, tmp_path / "out", ep=3, progress=lambda m: None)
