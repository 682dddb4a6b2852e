"""Blockwise FP8 weights for FP8 rollout engines (`lcot_mega.weight_sync.fp8`, docs/FP8.md), worked by hand on CPU.

The e4m3 error bound used below: e4m3fn has 3 mantissa bits, so normal values in [2^e, 2^(e+1)) are spaced
2^(e-3) and rounding to nearest errs by at most 2^(e-4) <= |x| * 2^-4; below the smallest normal 2^-6 the
subnormals are spaced 2^-9, an error of at most 2^-10. In the scaled domain x = w / s, so per element
|w - deq(w)| <= max(|w| * 2^-4, s * 2^-10), s being the element's block `scale_inv`.

The GPU test at the end starts SGLang on a block-FP8 checkpoint and syncs FP8 weights into it; it is skipped
without CUDA and sglang (never run on the CPU development machines).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers.tiny_models import make_tiny_hf, save_char_tokenizer

from lcot_mega.config import ConfigError, load_config
from lcot_mega.trainer.preflight import weight_dtype_errors
from lcot_mega.weight_sync.fp8 import (
    AMAX_EPS,
    FP8_MAX,
    dequantize_blockwise,
    fp8_named_tensors,
    is_fp8_weight,
    quantize_blockwise,
    save_fp8_checkpoint,
)
from lcot_mega.weight_sync.push import engine_buckets

S = 0.0625  # 28 / 448: a power of two, so w / S and q * S are exact in fp32


def _block_with(values: list[float], shape: tuple[int, int] = (128, 128)) -> torch.Tensor:
    w = torch.zeros(shape)
    w.view(-1)[: len(values)] = torch.tensor(values)
    return w


# ------------------------------------------------------------------------------------------ quantize


def test_a_block_whose_amax_maps_to_448_round_trips_exactly():
    # amax 28 -> scale_inv 28 / 448 = 1/16; every w / S below is an e4m3 value (448 = 1.75 * 2^8, 1.125 = 1 + 1/8,
    # 2^-9 the smallest subnormal), so quantizing loses nothing
    values = [28.0, -28.0, 14.0, 1.75, S * 1.125, 0.0, S * 2**-9, -S * 2**-6]
    q, scale_inv = quantize_blockwise(_block_with(values))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (128, 128)
    assert scale_inv.dtype == torch.float32 and scale_inv.tolist() == [[S]]
    assert q.float().view(-1)[:8].tolist() == [448.0, -448.0, 224.0, 28.0, 1.125, 0.0, 2**-9, -(2**-6)]
    assert dequantize_blockwise(q, scale_inv).view(-1)[:8].tolist() == values


def test_values_between_e4m3_neighbours_round_to_nearest_even():
    # 1.0625 is halfway between 1 and 1.125 (spacing 1/8 in [1, 2)): even mantissa -> 1; 17 is halfway between
    # 16 and 18 (spacing 2 in [16, 32)) -> 16; 1.1 is nearer 1.125; 0.75 * 2^-9 is nearer 2^-9 than 0
    values = [28.0, S * 1.0625, S * 17, S * 1.1, S * 0.75 * 2**-9]
    q, _ = quantize_blockwise(_block_with(values))
    assert q.float().view(-1)[1:5].tolist() == [1.0, 16.0, 1.125, 2**-9]


def test_dequantization_error_is_within_the_e4m3_bound_in_every_block():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 260, generator=gen) * torch.logspace(-4, 1, 300)[:, None]  # blocks of very different scale
    w[5, 7] = 1e-9  # deep in the subnormal range of its block
    q, scale_inv = quantize_blockwise(w)
    err = (w - dequantize_blockwise(q, scale_inv)).abs()
    s = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :260]
    bound = torch.maximum(w.abs() * 2**-4, s * 2**-10) * (1 + 1e-6)  # + fp32 rounding of w / s
    assert bool((err <= bound).all())
    assert float((err / s).max()) <= FP8_MAX * 2**-4  # per block: at most amax / 16 = 28 scale units
    assert float(err.max()) > 0  # the bound is not met vacuously


def test_shapes_that_are_not_multiples_of_the_block_get_rounded_up_scale_grids():
    w = torch.zeros(130, 257)
    w[129, 256] = -7.0  # the only value of the last (2 x 1) partial block
    w[0, 0] = 3.5
    q, scale_inv = quantize_blockwise(w)
    assert q.shape == (130, 257) and scale_inv.shape == (2, 3)
    assert scale_inv[1, 2] == pytest.approx(7.0 / 448) and scale_inv[0, 0] == pytest.approx(3.5 / 448)
    assert float(q[129, 256].float()) == -448.0 and float(q[0, 0].float()) == 448.0
    torch.testing.assert_close(dequantize_blockwise(q, scale_inv), w, rtol=0, atol=1e-6)


def test_a_zero_block_gets_a_finite_scale_and_dequantizes_to_zero():
    w = torch.zeros(256, 128)
    w[200, 3] = 1.0  # the second block is not zero
    q, scale_inv = quantize_blockwise(w)
    assert scale_inv[0, 0] == pytest.approx(AMAX_EPS / 448) and scale_inv[1, 0] == pytest.approx(1 / 448)
    assert bool(torch.isfinite(scale_inv).all()) and float(q[:128].float().abs().sum()) == 0.0
    assert dequantize_blockwise(q, scale_inv).equal(w)


def test_other_block_shapes_and_bad_inputs():
    q, scale_inv = quantize_blockwise(torch.ones(4, 6), block=(2, 4))
    assert scale_inv.shape == (2, 2) and torch.allclose(scale_inv, torch.full((2, 2), 1 / 448))
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.ones(8))
    with pytest.raises(ValueError, match="does not match"):
        dequantize_blockwise(q, scale_inv[:1])


# ---------------------------------------------------------------------------------------- naming


def _qwen2_like() -> list[tuple[str, torch.Tensor]]:
    t = torch.ones
    return [
        ("model.embed_tokens.weight", t(96, 64)),
        ("model.layers.0.self_attn.q_proj.weight", t(64, 64)),
        ("model.layers.0.self_attn.q_proj.bias", t(64)),
        ("model.layers.0.input_layernorm.weight", t(64)),
        ("model.layers.0.mlp.gate.weight", t(8, 64)),  # a MoE router
        ("model.layers.0.mlp.gate_proj.weight", t(112, 64)),
        ("model.norm.weight", t(64)),
        ("lm_head.weight", t(96, 64)),
    ]


def test_linear_weights_become_fp8_plus_scale_inv_and_the_rest_passes_through_unchanged():
    named = _qwen2_like()
    out = list(fp8_named_tensors(named))
    assert [n for n, _ in out] == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight_scale_inv",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.gate_proj.weight_scale_inv",
        "model.norm.weight",
        "lm_head.weight",
    ]
    by_name = dict(out)
    for name, t in named:
        if name.endswith(("q_proj.weight", "gate_proj.weight")):
            assert by_name[name].dtype == torch.float8_e4m3fn and by_name[name].shape == t.shape
            assert by_name[name + "_scale_inv"].equal(torch.tensor([[1 / 448]]))  # 1 / 448 in float32
        else:
            assert by_name[name] is t  # not copied
    assert not is_fp8_weight("model.layers.0.self_attn.o_proj.weight", torch.ones(64, 64), skip=("o_proj",))


def test_engine_buckets_leave_auto_untouched_and_quantize_each_fp8_bucket_within_its_bytes():
    buckets = [_qwen2_like()[:3], _qwen2_like()[3:]]
    assert engine_buckets(buckets, "auto") is buckets
    out = list(engine_buckets(iter(buckets), "fp8"))
    assert len(out) == 2 and [n for n, _ in out[0]][2] == "model.layers.0.self_attn.q_proj.weight_scale_inv"
    for before, after in zip(buckets, out, strict=True):
        nbytes = [sum(t.numel() * t.element_size() for _, t in b) for b in (before, after)]
        assert nbytes[1] <= nbytes[0]
    # q_proj: 64 x 64 fp32 (16384 bytes) -> 4096 fp8 bytes + one fp32 scale
    assert sum(t.numel() * t.element_size() for _, t in out[0]) == 96 * 64 * 4 + 4096 + 4 + 64 * 4
    with pytest.raises(ValueError, match="weight_dtype"):
        engine_buckets(buckets, "int8")


# ---------------------------------------------------------------------------------- model sanity


def test_a_tiny_models_logits_survive_a_round_trip_of_its_linear_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    # the default init (std 0.02); a sharp random 4-layer net (std 0.2) is chaotic and amplifies any perturbation
    model = AutoModelForCausalLM.from_pretrained(make_tiny_hf(tmp_path / "m", "qwen2"))
    ids = torch.arange(3, 60).view(1, -1)
    with torch.no_grad():
        ref = model(ids).logits[0]  # [T, V]
        touched = 0
        for name, p in model.named_parameters():
            if is_fp8_weight(name, p):
                p.copy_(dequantize_blockwise(*quantize_blockwise(p)))
                touched += 1
        out = model(ids).logits[0]
    assert touched == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 layers
    diff = float((out - ref).abs().max())
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1)  # [T]
    # sanity bound: weights moved by <= 2^-4 relative; here the logits by 3 % of their range (KL 1.3e-5)
    assert 0 < diff < 0.1 * float(ref.abs().max()) and float(kl.max()) < 1e-3
    assert out.argmax(-1).equal(ref.argmax(-1))


def test_save_fp8_checkpoint_writes_the_quantized_tensors_and_the_quantization_config(tmp_path):
    from safetensors.torch import load_file

    src = make_tiny_hf(tmp_path / "m", "llama")
    save_char_tokenizer(src)
    out = save_fp8_checkpoint(src, tmp_path / "fp8")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]
    }  # fmt: skip
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    q, scale_inv = quantize_blockwise(before[name])
    assert after[name].dtype == torch.float8_e4m3fn and after[name].view(torch.uint8).equal(q.view(torch.uint8))
    assert after[name + "_scale_inv"].equal(scale_inv)
    assert after["model.embed_tokens.weight"].equal(before["model.embed_tokens.weight"])
    assert len(after) == len(before) + 4 * 7 and (out / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------------ config


def test_weight_dtype_fp8_is_refused_for_the_embedded_engine_with_the_key_named():
    cfg = load_config(None, ["rollout.weight_dtype=fp8"])
    (error,) = weight_dtype_errors(cfg)
    assert "rollout.weight_dtype" in error and "rollout.engine = 'embedded'" in error
    assert weight_dtype_errors(load_config(None, ["rollout.weight_dtype=fp8", "rollout.engine=sglang"])) == []
    assert weight_dtype_errors(load_config(None, [])) == []
    (vllm,) = weight_dtype_errors(load_config(None, ["rollout.weight_dtype=fp8", "rollout.engine=vllm"]))
    assert "SGLang servers only" in vllm
    with pytest.raises(ConfigError, match=r"rollout\.weight_dtype"):
        load_config(None, ["rollout.weight_dtype=int8"])


def test_fp8_servers_start_from_a_block_fp8_copy_written_once(tmp_path):
    from lcot_mega.cluster.runtime import _served_model, server_command

    model = make_tiny_hf(tmp_path / "model", "llama")
    cfg = load_config(None, [f"model.path={model}", "rollout.weight_dtype=fp8", "rollout.engine=sglang"])
    copy = _served_model(cfg, tmp_path / "run" / "logs")
    assert copy == tmp_path / "run" / "fp8-model"
    assert json.loads((copy / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    written = (copy / "config.json").stat().st_mtime_ns
    assert _served_model(cfg, tmp_path / "run" / "logs") == copy
    assert (copy / "config.json").stat().st_mtime_ns == written  # reused, not rewritten
    assert str(copy) in server_command(cfg, copy)(0, 30000)
    auto = load_config(None, [f"model.path={model}"])
    assert _served_model(auto, tmp_path / "run2" / "logs") == model and not (tmp_path / "run2").exists()


# --------------------------------------------------------------------------------------------- GPU

GPU_TINY = dict(  # every linear dimension a multiple of 128: SGLang's merged qkv / gate_up need whole blocks
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    initializer_range=0.1,
)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None),
    reason="needs a CUDA GPU and the sglang package",
)
def test_sglang_serving_block_fp8_takes_synced_fp8_weights(tmp_path):
    """Not run on the CPU machines. Engine 1 starts from the FP8 checkpoint of model B and receives model A's
    FP8 weights through `/update_weights_from_tensor`; engine 2 starts from the FP8 checkpoint of A. Same FP8
    weights, same kernels: the greedy outputs must be equal. The transformers model with A's dequantized weights
    agrees on engine 1's greedy tokens only to a tolerance (SGLang also quantizes activations, per 1 x 128 group)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lcot_mega.rollout.launcher import ServerSupervisor, sglang_command
    from lcot_mega.rollout.protocol import SamplingParams

    a = make_tiny_hf(tmp_path / "a", "llama", seed=0, **GPU_TINY)
    b = make_tiny_hf(tmp_path / "b", "llama", seed=1, **GPU_TINY)
    for d in (a, b):
        save_char_tokenizer(d)
    dirs = [save_fp8_checkpoint(b, tmp_path / "b-fp8"), save_fp8_checkpoint(a, tmp_path / "a-fp8")]

    def command(i: int, port: int) -> list[str]:
        extra = ["--dtype", "bfloat16", "--quantization", "fp8", "--disable-cuda-graph", "--context-length", "1024"]
        return sglang_command(dirs[i], port, mem_fraction_static=0.2, random_seed=0, extra_args=extra)

    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [20, 21]]
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    with ServerSupervisor(command, 2, tmp_path / "logs", health_deadline_s=600) as sup:
        synced, fresh = sup.client(0, timeout_s=120), sup.client(1, timeout_s=120)
        before = [g[0].token_ids for g in synced.generate(prompts, greedy)]
        weights = {n: t.to(torch.bfloat16) for n, t in load_file(str(a / "model.safetensors")).items()}
        synced.update_weights(list(fp8_named_tensors(weights.items())), 1)
        after = [g[0].token_ids for g in synced.generate(prompts, greedy)]
        expected = [g[0].token_ids for g in fresh.generate(prompts, greedy)]
        assert after == expected and after != before
        scores = [synced.score(p, r) for p, r in zip(prompts, after, strict=True)]

    model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_fp8_weight(name, p):
                p.copy_(dequantize_blockwise(*quantize_blockwise(p)))
        for prompt, response, score in zip(prompts, after, scores, strict=True):
            ids = torch.tensor([prompt + response])
            logp = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)  # [R, V]
            ref = logp.gather(-1, torch.tensor(response)[:, None])[:, 0]
            torch.testing.assert_close(score.float(), ref, atol=0.1, rtol=0)


def test_auto_buckets_travel_in_the_engines_dtype_when_it_is_given():
    buckets = [[("w", torch.randn(4, 4)), ("ids", torch.arange(3))]]
    (out,) = list(engine_buckets(buckets, "auto", dtype=torch.bfloat16))
    assert out[0][1].dtype == torch.bfloat16 and torch.equal(out[0][1], buckets[0][0][1].to(torch.bfloat16))
    assert out[1][1] is buckets[0][1][1]  # integers are not weights: untouched
