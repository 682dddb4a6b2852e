"""Blockwise FP8 weights for rollout engines that serve a block-quantized checkpoint (docs/FP8.md).

The convention is DeepSeek-V3's, which SGLang, vLLM and slime share (`quantization_config: {quant_method: fp8,
fmt: e4m3, activation_scheme: dynamic, weight_block_size: [128, 128]}`):

- a linear layer's `weight` [out, in] is stored as float8_e4m3fn next to `weight_scale_inv`, float32
  [ceil(out / 128), ceil(in / 128)]: one scale per 128 x 128 block, rows (output features) first. SGLang's
  `Fp8LinearMethod.create_fp8_weight_` registers exactly these two parameters (sglang
  `srt/layers/quantization/fp8.py`; partial edge blocks get their own scale, the grid is rounded up), and so does
  vLLM's `Fp8LinearMethod.create_weights` ("The weight_scale_inv name is intentional for deepseekv3").
- quantize: `scale_inv = max(amax(block), 1e-10) / 448`, `q = clamp(w / scale_inv, -448, 448)` cast to e4m3
  (round to nearest even); 448 is `torch.finfo(torch.float8_e4m3fn).max`. DeepSeek-V3 `inference/kernel.py`
  `act_quant_kernel` (s = amax / 448., y = x / s) and slime `_blockwise_cast_to_fp8_triton` (the 1e-10 floor,
  which keeps an all-zero block finite).
- dequantize: `w = q * scale_inv` per block (DeepSeek-V3 `weight_dequant_kernel`: y = x * s).
- only the linear layers are quantized: SGLang's `Fp8Config.get_quant_method` gives Fp8 methods to `LinearBase`
  (and fused MoE) layers only, so embeddings, lm_head and norms stay in the model dtype; biases are separate 1-D
  tensors; MoE routers (`mlp.gate`) are left out as slime's `quantize_params` and llm-compressor's FP8_BLOCK
  recipes (`ignore: ["re:.*gate$", "lm_head", "model.embed_tokens"]`) do.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
"""448: the largest finite e4m3fn value (exponent 8, mantissa 1.75)."""
AMAX_EPS = 1e-10
"""Floor on a block's amax, so an all-zero block gets a finite scale (slime's `eps`)."""
DEFAULT_BLOCK = (128, 128)
DEFAULT_SKIP = ("embed_tokens.", "lm_head.", ".mlp.gate.", "shared_expert_gate.")
"""Name fragments of 2-D `.weight` tensors that stay unquantized: embeddings, output head, MoE routers."""

Named = tuple[str, torch.Tensor]


def _grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8 [R, C] float8_e4m3fn, scale_inv [ceil(R/bn), ceil(C/bk)] float32) with w ~ w_fp8 * scale_inv.

    Partial edge blocks are padded with zeros, which leave a block's amax unchanged. Non-finite weights are not
    checked here: they give NaN scales, which the sync's probe check then reports."""
    if w.dim() != 2:
        raise ValueError(f"blockwise FP8 quantizes 2-D weights, got shape {tuple(w.shape)}")
    (rows, cols), (bn, bk) = w.shape, block
    nr, nc = _grid((rows, cols), block)
    padded = F.pad(w.float(), (0, nc * bk - cols, 0, nr * bn - rows))  # [nr*bn, nc*bk]
    blocks = padded.view(nr, bn, nc, bk)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=AMAX_EPS) / FP8_MAX  # [nr, nc]
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nr * bn, nc * bk)[:rows, :cols].contiguous(), scale_inv


def dequantize_blockwise(
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w_fp8 * scale_inv, each scale spread over its block (DeepSeek-V3 `weight_dequant`), as `dtype`."""
    rows, cols = w_fp8.shape
    if tuple(scale_inv.shape) != _grid((rows, cols), block):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match {rows}x{cols} in {block} blocks")
    s = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return (w_fp8.float() * s).to(dtype)


def is_fp8_weight(name: str, tensor: torch.Tensor, skip: Iterable[str] = DEFAULT_SKIP) -> bool:
    """Whether the HF tensor `name` is a linear layer's weight that an FP8 checkpoint stores in e4m3: a 2-D
    `...weight` none of whose `skip` fragments occur in the name."""
    return name.endswith(".weight") and tensor.dim() == 2 and not any(s in name for s in skip)


def fp8_named_tensors(
    named: Iterable[Named], *, block: tuple[int, int] = DEFAULT_BLOCK, skip: Iterable[str] = DEFAULT_SKIP
) -> Iterator[Named]:
    """Each linear `...weight` as (name, e4m3 weight) then (name + "_scale_inv", float32 scales); every other
    tensor (embeddings, lm_head, norms, biases, routers) passes through unchanged, in the same order."""
    skip = tuple(skip)
    for name, t in named:
        if is_fp8_weight(name, t, skip):
            q, scale_inv = quantize_blockwise(t, block)
            yield name, q
            yield name + "_scale_inv", scale_inv
        else:
            yield name, t


def fp8_quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict:
    """The `quantization_config` of config.json that makes SGLang / vLLM build block-FP8 linear layers."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


def save_fp8_checkpoint(hf_dir: str | Path, out_dir: str | Path, block: tuple[int, int] = DEFAULT_BLOCK) -> Path:
    """Write a block-FP8 copy of the safetensors HF directory `hf_dir` into `out_dir` (shard by shard, same shard
    names, the index rewritten) with `quantization_config` in config.json: the checkpoint an FP8 engine starts
    from (SGLang accepts block quantization only from an FP8-serialized checkpoint, `Fp8Config.__init__`)."""
    from safetensors.torch import load_file, save_file

    src, out = Path(hf_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors = dict(fp8_named_tensors(load_file(str(shard)).items(), block=block))
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    if not weight_map:
        raise FileNotFoundError(f"{src} holds no .safetensors files")
    if (src / "model.safetensors.index.json").is_file():
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = fp8_quantization_config(block)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    return out
