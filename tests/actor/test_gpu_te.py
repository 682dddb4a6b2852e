"""GPU tier: the Transformer Engine layer spec and FP8 path (skipped without CUDA + transformer_engine).

Run on a GPU machine with `python -m pytest -m gpu tests/actor/test_gpu_te.py`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers.distributed_harness import free_port
from helpers.tiny_models import FAMILIES, VOCAB, make_tiny_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
        reason="needs CUDA and transformer_engine",
    ),
]

INPUT_IDS = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))


def _te_logits(hf_dir: str, fp8: str | None) -> tuple[torch.Tensor, list[str]]:
    import os

    import torch.distributed as dist
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.bridge.hf_load import load_hf_weights
    from lcot_mega.config import ActorConfig

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    cfg = ActorConfig(precision="bf16", fp8=fp8)
    layout = ma.init_parallel(cfg, seed=1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    chunks = [c.cuda() for c in ma.build_model(arch, cfg)]
    load_hf_weights(chunks, hf_dir, arch, layout.tp_rank, layout.tp_size)
    names = [n for n, _ in chunks[0].named_parameters()]
    ids = INPUT_IDS.cuda()
    with torch.no_grad():
        logits = chunks[0](ids, torch.arange(ids.shape[1], device="cuda").unsqueeze(0), None)
    return logits.float().cpu()[..., :VOCAB], names


@pytest.mark.parametrize("family", FAMILIES)
def test_te_spec_loads_hf_weights_and_matches_transformers_in_bf16(tmp_path, family):
    from transformers import AutoModelForCausalLM

    hf_dir = make_tiny_hf(tmp_path / family, family, tie=family == "qwen3")
    logits, names = _te_logits(str(hf_dir), fp8=None)
    assert any(n.endswith("linear_qkv.layer_norm_weight") for n in names)  # the TE spec, not the local one
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        expected = ref(INPUT_IDS.cuda()).logits.float().cpu()
    assert (logits - expected).abs().max().item() < 0.1  # bf16 rounding of two different kernels


def test_fp8_forward_stays_close_to_bf16(tmp_path):
    hf_dir = make_tiny_hf(tmp_path / "llama", "llama", hidden_size=128, intermediate_size=256)
    bf16, _ = _te_logits(str(hf_dir), fp8=None)
    fp8, _ = _te_logits(str(hf_dir), fp8="e4m3")
    rel = (fp8 - bf16).norm() / bf16.norm()
    assert rel.item() < 0.1


def _te_actor_logprobs(hf_dir: str, sequences: list, **settings) -> list[torch.Tensor]:
    """MegatronActor (TE spec, bf16) log-probs of `sequences` under extra actor `settings`."""
    import os

    import torch.distributed as dist
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    actor = MegatronActor(arch, ActorConfig(precision="bf16", micro_batch_tokens=64, **settings), AlgoConfig(), hf_dir)
    out = actor.compute_logprobs(sequences)
    ma.destroy_parallel()
    return out


def test_te_packed_sequences_and_chunked_logprobs_equal_padded_full_logits(tmp_path):
    """THD packing through TE's attention and log-probs from hidden states give the padded, full-logits values."""
    hf_dir = str(make_tiny_hf(tmp_path / "qwen2", "qwen2"))
    g = torch.Generator().manual_seed(2)
    shapes = [(5, 20), (3, 9), (12, 31), (2, 2), (7, 14)]
    sequences = [
        (torch.randint(0, VOCAB, (p,), generator=g).tolist(), torch.randint(0, VOCAB, (r,), generator=g).tolist())
        for p, r in shapes
    ]
    reference = _te_actor_logprobs(hf_dir, sequences, logits_chunk_tokens=0)
    for settings in (dict(logits_chunk_tokens=8), dict(logits_chunk_tokens=8, pack_sequences=True)):
        got = _te_actor_logprobs(hf_dir, sequences, **settings)
        for i, (a, b) in enumerate(zip(got, reference, strict=True)):
            assert (a - b).abs().max().item() < 0.05, (settings, i)  # bf16 kernels of different shapes


def _cp_logprobs(rank: int, world: int, hf_dir: str, sequences: list, layouts: list) -> dict:
    """Per layout name: MegatronActor log-probs of `sequences` on this rank (NCCL, one GPU per rank)."""
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    out = {}
    for name, settings in layouts:
        cfg = ActorConfig(micro_batch_tokens=256, logits_chunk_tokens=16, **settings)
        actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
        out[name] = [t.float() for t in actor.compute_logprobs(sequences)]
        ma.destroy_parallel()
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallelism over 2 GPUs")
def test_context_parallel_log_probs_equal_cp1_with_te_attention_and_with_sdpa(tmp_path):
    """CP2 (each sequence split over the 2 GPUs, load-balanced) against CP1 (DP2) on the same 2 GPUs: Transformer
    Engine's context-parallel attention (p2p ring) in bf16, and the sdpa attention's all-gathered K/V in fp32."""
    from helpers.distributed_harness import run_gloo

    hf_dir = str(make_tiny_hf(tmp_path / "qwen2", "qwen2", max_position_embeddings=512))
    g = torch.Generator().manual_seed(4)
    shapes = [(17, 150), (5, 61), (40, 203), (3, 8)]
    sequences = [
        (torch.randint(0, VOCAB, (p,), generator=g).tolist(), torch.randint(0, VOCAB, (r,), generator=g).tolist())
        for p, r in shapes
    ]
    layouts = [
        ("te_cp1", dict(precision="bf16")),
        ("te_cp2", dict(precision="bf16", context_parallel=2)),
        ("sdpa_cp1", dict(precision="fp32", attention="sdpa")),
        ("sdpa_cp2", dict(precision="fp32", attention="sdpa", context_parallel=2)),
    ]
    for rank, out in enumerate(run_gloo(_cp_logprobs, 2, hf_dir, sequences, layouts)):
        for backend, tolerance in (("te", 0.05), ("sdpa", 1e-4)):  # bf16 kernels of other shapes; fp32
            for i, (a, b) in enumerate(zip(out[f"{backend}_cp2"], out[f"{backend}_cp1"], strict=True)):
                assert a.shape == b.shape and (a - b).abs().max().item() < tolerance, (rank, backend, i)
