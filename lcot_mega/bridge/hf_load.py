"""Load Hugging Face safetensors straight into a sharded Megatron-core model.

Each rank reads only the slices it holds (`safe_open(...).get_slice`), so a 70B checkpoint is never
materialized on one rank. Only safetensors are read: a pickled `pytorch_model.bin` from elsewhere
could run code on load, so it is refused with a message saying how to convert it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from lcot_mega.bridge.arch import ArchSpec
from lcot_mega.bridge.mapping import ROW, fuse, hf_slice, rule_for


class CheckpointError(FileNotFoundError):
    """An HF directory without the weights (or with weights the model does not expect)."""


def safetensors_index(hf_dir: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: hf_dir / file for name, file in weight_map.items()}
    single = hf_dir / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    if any(hf_dir.glob("*.bin")):
        raise CheckpointError(
            f"{hf_dir} holds pickled .bin weights only; lcot-mega reads safetensors (pickles can run code on load). "
            "Convert once with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)"
        )
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}")


def named_params_with_layers(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter, int | None]]:
    """(local name, parameter, global layer index or None) of one GPTModel chunk. A MoE layer's experts are named by
    their global index (`...local_experts.{global}...`: under expert parallelism a rank holds experts
    `local_expert_indices`, numbered from 0 in its own module tree), whichever module holds them: SequentialMLP
    (`local_experts.{j}.linear_fc1.weight`) or Transformer Engine's grouped GEMM (`linear_fc1.weight{j}`)."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", [])
    offsets = [layer.layer_number - 1 for layer in layers]  # layer_number is global and 1-based
    experts = [getattr(getattr(layer, "mlp", None), "local_expert_indices", None) for layer in layers]
    for name, param in chunk.named_parameters():
        global_layer = None
        if name.startswith("decoder.layers."):
            j = int(name.split(".")[2])
            global_layer = offsets[j]
            if experts[j] is not None:
                name = global_expert_name(name, experts[j])
        yield name, param, global_layer


def global_expert_name(name: str, local_expert_indices: Sequence[int]) -> str:
    """`name` of a layer's parameter with its expert (if any) named by global index, as SequentialMLP names it."""
    grouped = _GROUPED_EXPERT.search(name)
    if grouped:  # TEGroupedMLP: one parameter per local expert, the index at the end
        prefix, fc, j = name[: grouped.start()], grouped.group(1), int(grouped.group(2))
        return f"{prefix}.mlp.experts.local_experts.{local_expert_indices[j]}.{fc}.weight"
    return _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{local_expert_indices[int(m.group(2))]}.", name)


_LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)\.")
_GROUPED_EXPERT = re.compile(r"\.mlp\.experts\.(linear_fc1|linear_fc2)\.weight(\d+)$")


class _Reader:
    """Opens each safetensors file once and reads slices of named tensors."""

    def __init__(self, index: dict[str, Path], stack: ExitStack) -> None:
        self._index, self._stack, self._open = index, stack, {}

    def read(self, name: str, rows: slice, dim: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        if name not in self._index:
            raise CheckpointError(f"HF checkpoint has no tensor {name!r} (does the config match the weights?)")
        path = self._index[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        sl = self._open[path].get_slice(name)
        shape = tuple(sl.get_shape())
        if dim == 0 or len(shape) == 1:
            return sl[rows], shape
        return sl[:, rows], shape


@torch.no_grad()
def load_hf_weights(
    chunks: list[torch.nn.Module],
    hf_dir: str | Path,
    arch: ArchSpec,
    tp_rank: int,
    tp_size: int,
    expert_tp: tuple[int, int] | None = None,
) -> int:
    """Copy this rank's slices of the HF weights into `chunks`; returns the number of parameters filled.
    `expert_tp`: (rank, size) of the group that splits each expert, where it is not the tensor-parallel group."""
    index = safetensors_index(hf_dir)
    filled = 0
    with ExitStack() as stack:
        reader = _Reader(index, stack)
        for chunk in chunks:
            for name, param, layer in named_params_with_layers(chunk):
                rule = rule_for(name, layer, arch)
                dim = 1 if rule.layout == ROW else 0
                rank, size = expert_tp if expert_tp is not None and _LOCAL_EXPERT.search(name) else (tp_rank, tp_size)
                pieces = []
                for i, hf_name in enumerate(rule.hf_names):
                    shape = reader.read(hf_name, slice(0, 0), 0)[1]
                    piece, _ = reader.read(hf_name, hf_slice(rule, i, shape, rank, size, arch), dim)
                    pieces.append(piece)
                local = fuse(rule, pieces, arch, local_rows=param.shape[0])
                if tuple(local.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"{name}: HF tensors {rule.hf_names} give shape {tuple(local.shape)} on TP rank {rank},"
                        f" the model expects {tuple(param.shape)}"
                    )
                param.copy_(local.to(param.dtype))
                filled += 1
    return filled
