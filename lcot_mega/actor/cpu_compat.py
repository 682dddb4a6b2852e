"""Let megatron-core run on a CPU-only torch (gloo), for development and CI.

megatron-core assumes CUDA throughout. Measured on 0.16.1 (STACK-NOTES.md), what has to be redirected
to run TP/PP/DP with DDP, the distributed optimizer and dist-checkpointing on CPU:

- CUDA devices passed as arguments (`device="cuda"`, `device=torch.cuda.current_device()`, `.cuda()`,
  `pin_memory=True`) in the causal mask, grad buffers, clip_grads, pipeline p2p, RoPE, optimizer:
  one `TorchFunctionMode` rewrites every device argument to CPU, so no call site is patched by hand.
- Type checks `param.type() == 'torch.cuda.FloatTensor'` (clip_grads, optimizers): under the mode an
  argument-less `Tensor.type()` reports the CUDA type name of the same dtype.
- `torch.cuda.*` calls with no CPU meaning (synchronize, set_device, streams, events, memory stats):
  no-ops or neutral values. `torch.cuda.is_available()` stays False so megatron picks its CPU paths.
- Activation recompute: `CheckpointFunction.backward` reruns modules where the mode is not active; it is
  re-entered there.
- The CUDA RNG (`model_parallel_cuda_manual_seed`, the tensor-parallel RNG tracker): mapped to the CPU
  default generator, which is what dropout uses on CPU. Seeding goes to
  `torch.default_generator.manual_seed` directly: `torch.manual_seed` would call back into
  `torch.cuda.manual_seed_all` and recurse.

- Sequence parallelism: its collectives (all_gather_into_tensor, reduce_scatter_tensor) run on gloo as they are;
  the one gloo lacks, an all-gather of unequal parts (the all-to-all MoE dispatcher's, with TP and EP), is done
  padded. Its norms are `megatron_adapter.LocalRMSNorm`.

Applied only when no GPU is present (`enable()` is a no-op on a CUDA machine) and at most once per
process.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_mode: TorchFunctionMode | None = None

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _to_cpu_device(device: Any) -> Any:
    """CUDA device specs (str, torch.device, int ordinal) become "cpu"; anything else passes through."""
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None

    def record_event(self, *args: Any, **kwargs: Any) -> _NullStream:
        """An event that is already complete (MoE's all-to-all dispatcher waits on one: `d2h_event.synchronize()`)."""
        return _NullStream()

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _seed_cpu(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    replacements = {
        "synchronize": lambda *a, **k: None,
        "set_device": lambda *a, **k: None,
        "current_device": lambda: 0,
        "get_rng_state": _cpu_rng_state,
        "set_rng_state": _set_cpu_rng_state,
        "manual_seed": _seed_cpu,
        "manual_seed_all": _seed_cpu,
        "current_stream": lambda *a, **k: _NullStream(),
        "default_stream": lambda *a, **k: _NullStream(),
        "Stream": _NullStream,
        "Event": _NullStream,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "empty_cache": lambda: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
    }
    for name, fn in replacements.items():
        setattr(cuda, name, fn)


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state


_MEGATRON_FUNCTION_MODULES = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
)


def _patch_function_backwards() -> None:
    """A custom `torch.autograd.Function`'s backward runs in the autograd engine's thread, without this thread's
    function-mode stack: megatron-core's would see their CUDA device arguments again (recompute's
    `CheckpointFunction` rerunning a layer, the MoE all-to-all and gather mappings allocating on
    `torch.cuda.current_device()`). Every megatron-core Function's backward runs under the mode too."""
    import importlib

    for module in _MEGATRON_FUNCTION_MODULES:
        importlib.import_module(module)
    seen, todo = set(), list(torch.autograd.Function.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo += cls.__subclasses__()
        if cls.__module__.startswith("megatron.core") and "backward" in cls.__dict__:
            inner = cls.__dict__["backward"]
            inner = inner.__func__ if isinstance(inner, staticmethod) else inner

            def backward(ctx: Any, *grads: Any, _inner: Any = inner) -> Any:
                with active():
                    return _inner(ctx, *grads)

            cls.backward = staticmethod(backward)


def _patch_megatron_moe() -> None:
    """Two megatron-core 0.16 MoE paths that assume CUDA: the router's gating names `te_general_gemm`, defined only
    when Transformer Engine imports (a NameError without it), and the all-to-all dispatcher's split sizes stay
    tensors on CPU (`maybe_move_tensor_to_cpu(as_numpy=True)` converts CUDA tensors only), which
    `all_to_all_single` refuses."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    original = token_dispatcher.maybe_move_tensor_to_cpu

    def to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor):
            return tensor.detach().cpu().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_cpu


def _patch_uneven_all_gather() -> None:
    """gloo's allgather takes equal parts only; megatron's `_gather_along_first_dim` with `output_split_sizes` (the
    all-to-all MoE dispatcher's gather over the expert tensor-parallel group, when EP > 1) gets every part padded to
    the largest, one `all_gather_into_tensor`, and the padding cut away."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def gather(input_: torch.Tensor, group: Any, output_split_sizes: Any = None, use_global_buffer: bool = False):
        if output_split_sizes is None or group.size() == 1 or dist.get_backend(group) != "gloo":
            return original(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((longest * group.size(), *input_.shape[1:]))
        dist.all_gather_into_tensor(out, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(out.split(longest), output_split_sizes, strict=True)])

    mappings._gather_along_first_dim = gather


def enable() -> bool:
    """Make megatron-core usable on this CPU-only process; returns True when the shim is active.

    Idempotent. Does nothing (returns False) when CUDA is available: the real paths are used there.
    """
    global _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _mode is None:
            _patch_torch_cuda()
            _patch_megatron_rng()
            _patch_function_backwards()
            _patch_megatron_moe()
            _patch_uneven_all_gather()
            _mode = _CudaToCpuMode()
            _mode.__enter__()  # stays pushed for the life of the process
    return True


def paused() -> contextlib.AbstractContextManager:
    """A block where no torch call goes through the mode (nor any tensor subclass's `__torch_function__`): for
    hot loops of plain CPU tensor copies that pass no device (the weight sync's ~15k calls, 2-4 us each through
    the mode). A no-op where the mode is not enabled (GPU machines)."""
    return torch._C.DisableTorchFunction() if _mode is not None else contextlib.nullcontext()


def active() -> contextlib.AbstractContextManager:
    """The mode for a block in this thread, where it is enabled but not on this thread's stack: a function-mode
    stack is per thread, so a thread other than the one that called `enable` (a sync started from a worker
    thread) would hand megatron-core's CUDA device arguments to torch as they are. A no-op elsewhere."""
    from torch.overrides import _get_current_function_mode_stack

    if _mode is None or any(isinstance(m, _CudaToCpuMode) for m in _get_current_function_mode_stack()):
        return contextlib.nullcontext()
    return _CudaToCpuMode()


def is_enabled() -> bool:
    return _mode is not None
