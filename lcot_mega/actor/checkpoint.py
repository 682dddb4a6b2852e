"""Save and load a Megatron-core model (+ optimizer, scheduler, RNG, step) with dist-checkpointing.

A checkpoint directory (committed atomically through `store`):

    step_000000120/
      model/        torch_dist dist-checkpoint of the unwrapped chunks' `sharded_state_dict()`
                    ("model", or "model0", "model1", ... with virtual pipeline chunks): any TP/PP/DP loads it
      optimizer/    (with an optimizer) `sharded_state_dict(..., distrib_optim_sharding_type=fully_reshardable)`
      rng/rank_00000.json   per-rank RNG states: python, numpy, torch CPU, CUDA, Megatron's tracker (JSON)
      hf/           (optional) the HF config and tokenizer files, so the checkpoint exports on its own
      meta.json     step, layout, model shape, scheduler state, the caller's `extra` (JSON, never pickle)
      COMPLETE      the store's manifest, written last

Loading never unpickles an arbitrary object. Our own files are JSON. torch_dist stores pickles in three
places, each checked before megatron reads it: `.metadata` (plain `pickle.load` in torch's reader) must
unpickle with an allow-list of torch checkpoint classes; `common.pt` must load with `weights_only=True`;
every byte object (Megatron `ShardedObject`s such as `_extra_state`, read by torch's planner with
`weights_only=False`) must load with `weights_only=True` first. (`weights_only` here includes the plain data
classes megatron-core registers as torch safe globals on import: BytesIO, numpy arrays, Namespace, its enums.)

megatron-core 0.16.1 issues handled here (STACK-NOTES.md), all on the torch-Adam path (no TE/apex):
- a fresh `DistributedOptimizer` asserts in `state_dict()` (no `step` yet), which both saving and
  `sharded_state_dict(is_loading=True)` call -> `_init_adam_state` creates the state Adam's lazy init would;
- `load_parameter_state_from_fully_reshardable` copies every key of the live state from the checkpoint,
  which has no `step` -> `KeyError: 'step'`; and `load_state_dict` gives every param ONE shared `step`
  tensor that Adam increments once per param (a resumed run silently diverges) -> `_load_optimizer` loads
  the parameter state with `step` set aside, then gives each param its own copy;
- only `distrib_optim_sharding_type="fully_reshardable"` works (passed through `metadata`: the
  `sharding_type` argument is deprecated).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import io
import json
import os
import pickle
import random
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import numpy as np
import torch
import torch.distributed as dist

from lcot_mega.actor import megatron_adapter as ma
from lcot_mega.actor.optimizer_state import saving_without_copies
from lcot_mega.checkpoint.store import (
    MANIFEST,
    CheckpointStore,
    CheckpointStoreError,
    CorruptCheckpointError,
    NoCheckpointError,
    atomic_checkpoint_dir,
    verify_checkpoint_dir,
)

FORMAT = "lcot-mega/megatron-dist/1"
META = "meta.json"
MODEL_DIR, OPTIMIZER_DIR, RNG_DIR, HF_DIR = "model", "optimizer", "rng", "hf"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
_HF_SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_HF_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointMismatchError(CheckpointStoreError, ValueError):
    """The checkpoint does not fit the model (or optimizer) it is loaded into; the message says how."""


class UnsafeCheckpointError(CheckpointStoreError):
    """A pickle in the checkpoint would need more than tensors and torch checkpoint metadata to load."""


class LoadedCheckpoint(TypedDict):
    step: int
    extra: dict
    path: Path
    layout: dict
    """The parallel layout it was saved with: world_size, tp, pp, dp, cp, vpp."""
    rng_restored: bool


# --- collective helpers ------------------------------------------------------------------------------------


def all_ranks_ok(ok: bool) -> bool:
    """`store.AllOk` over the default process group: a barrier that ANDs every rank's flag."""
    if not dist.is_initialized():
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def dist_store(
    root: str | Path, keep_last: int = 3, *, keep_good: int = 1, clean_stale: bool = True
) -> CheckpointStore:
    """The run's `CheckpointStore` as seen by this rank (global rank 0 writes; a shared filesystem is assumed)."""
    return CheckpointStore(
        root,
        keep_last,
        keep_good=keep_good,
        is_writer=_rank() == 0,
        all_ok=all_ranks_ok,
        clean_stale=clean_stale and _rank() == 0,
    )


# --- model / optimizer state dicts -------------------------------------------------------------------------


def _model_keys(num_chunks: int) -> list[str]:
    """Megatron's keys: "model" for one chunk, "model0", "model1", ... for virtual pipeline chunks."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict:
    return {k: ma.unwrap(c).sharded_state_dict() for k, c in zip(_model_keys(len(chunks)), chunks, strict=True)}


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    megatron_opts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [getattr(o, "optimizer", o) for o in megatron_opts if getattr(o, "optimizer", o) is not None]


@torch.no_grad()
def _init_adam_state(optimizer: Any) -> None:
    """Give a fresh torch Adam the state its lazy init would create at the first step (step 0, zero moments)."""
    for opt in _torch_optimizers(optimizer):
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW) or len(opt.state) > 0:
            continue
        for group in opt.param_groups:
            on_device = group.get("capturable") or group.get("fused")
            for p in group["params"]:
                state = opt.state[p]
                step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state["step"] = torch.zeros((), dtype=step_dtype, device=p.device if on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@contextmanager
def _adam_steps_set_aside(torch_opt: torch.optim.Optimizer) -> Iterator[None]:
    """Hide each param's `step` for the block, then give every param its own copy back.

    megatron 0.16.1 `load_parameter_state_from_fully_reshardable` copies every key of the live Adam state
    from the checkpoint's tensors, which never hold `step` (KeyError). And its `load_state_dict` puts ONE
    shared `step` tensor in every param's state, which Adam then increments once per param.
    """
    steps = {p: st.pop("step") for p, st in torch_opt.state.items() if "step" in st}
    try:
        yield
    finally:
        for p, step in steps.items():
            torch_opt.state[p]["step"] = step.detach().clone() if torch.is_tensor(step) else step


def _load_optimizer(optimizer: Any, state: Any) -> None:
    """`optimizer.load_state_dict(state)`, with the distributed optimizer's parameter state loaded around the
    0.16.1 `step` bugs (see `_adam_steps_set_aside`)."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(opts) == 1 else [state[i] for i in range(len(opts))]
    for opt, st in zip(opts, states, strict=True):
        distributed = hasattr(opt, "load_parameter_state_from_fully_reshardable")
        param_state = st.pop("param_state", None) if distributed else None
        kind = st.pop("param_state_sharding_type", None) if distributed else None
        opt.load_state_dict(st)  # param groups and Adam `step` (one shared tensor)
        if param_state is not None and kind != OPTIMIZER_METADATA["distrib_optim_sharding_type"]:
            raise CheckpointMismatchError(f"optimizer state has sharding type {kind!r}; only fully_reshardable loads")
        with _adam_steps_set_aside(opt.optimizer):
            if param_state is not None:
                opt.load_parameter_state_from_fully_reshardable(param_state)
    if len(opts) > 1:
        optimizer._synchronize_steps()


def _model_signature(chunks: Sequence[torch.nn.Module]) -> dict:
    model = ma.unwrap(chunks[0])
    c = model.config
    return {
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.ffn_hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_query_groups or c.num_attention_heads,
        "kv_channels": c.kv_channels,
        "gated_linear_unit": c.gated_linear_unit,
        "add_qkv_bias": c.add_qkv_bias,
        "qk_layernorm": c.qk_layernorm,
        "normalization": c.normalization,
        "padded_vocab_size": model.vocab_size,
        "tied_embeddings": model.share_embeddings_and_output_weights,
        **({"num_moe_experts": c.num_moe_experts, "moe_router_topk": c.moe_router_topk} if c.num_moe_experts else {}),
    }


def _layout(num_chunks: int) -> dict:
    layout = ma.current_layout()
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": layout.tp_size,
        "pp": layout.pp_size,
        "dp": layout.dp_size,
        "cp": layout.cp_size,
        "ep": layout.ep_size,
        "vpp": num_chunks if num_chunks > 1 else None,
    }


# --- RNG -----------------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    """This rank's RNG states as JSON-able data (python, numpy, torch CPU, CUDA, Megatron's tracker)."""
    from megatron.core import tensor_parallel

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "tracker": {k: _b64(v) for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["cuda"]))
    tensor_parallel.get_cuda_rng_tracker().set_states({k: _unb64(v) for k, v in state["tracker"].items()})


# --- save ----------------------------------------------------------------------------------------------------


def _json_or_raise(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serializable (checkpoints never pickle): {e}") from e
    return value


def copy_hf_side_files(hf_dir: str | Path, out: Path) -> list[str]:
    """Copy the HF config, generation config and tokenizer files (no weights) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(Path(hf_dir).iterdir()):
        if f.is_file() and f.suffix in _HF_SIDE_SUFFIXES and f.name not in _HF_WEIGHT_INDEXES:
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


def _writer_queue_dies_with_us() -> None:
    """Start the results-queue server of megatron's torch_dist writer ourselves, set to die with this process.

    megatron-core's `filesystem_async` starts a spawn `Manager()` on the first save and keeps it for the process's
    life; a trainer that crashes (a killed node, an OOM kill) leaves that server behind, holding the trainer's
    stdout/stderr open (a supervisor waiting for EOF then hangs). Our server gets PR_SET_PDEATHSIG.
    Started from the calling thread, which must live as long as the trainer (the main or the actor thread).
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", "absent") is not None:  # already made, or a megatron without that global
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    fa._results_queue = manager.Queue()


_SAVING = False
"""True while this process saves: whatever it forks then (megatron's writers) dies with it (`_writers_die_with_us`)."""


def _die_with_parent_if_saving() -> None:
    if _SAVING:
        _die_with_parent(os.getppid())


@contextmanager
def _writers_die_with_us() -> Iterator[None]:
    """Processes forked during the save get PR_SET_PDEATHSIG: megatron's torch_dist writer forks workers
    (`write_preloaded_data_multiproc`), and a trainer killed mid-save left them behind, blocked for good on a lock
    of the dead parent, holding its run directory's files open (found in a kill-and-resume test, 2026-12-06)."""
    global _SAVING
    _SAVING = True
    try:
        yield
    finally:
        _SAVING = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_die_with_parent_if_saving)


def _die_with_parent(parent_pid: int) -> None:
    """Killed with the trainer, and deaf to the SIGTERM / SIGINT sent to its whole process group (a scheduler's
    preemption, Ctrl-C): the trainer handles those by finishing its step and saving, which needs these helpers alive
    (a group SIGTERM killed the writer-queue server and the final save failed with a broken pipe, session 21)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _write_checkpoint(tmp: Path, chunks: Sequence[torch.nn.Module], optimizer: Any, meta: dict, hf_dir) -> None:
    from megatron.core import dist_checkpointing as dc

    rank = _rank()
    rng = rng_state()  # first: the state as the caller left it
    _writer_queue_dies_with_us()
    for sub in (MODEL_DIR, RNG_DIR) + ((OPTIMIZER_DIR,) if optimizer is not None else ()):
        (tmp / sub).mkdir(exist_ok=True)  # every rank: dc.save needs the directory to exist first
    with _writers_die_with_us():
        dc.save(model_sharded_state_dict(chunks), str(tmp / MODEL_DIR))
    if optimizer is not None:
        _init_adam_state(optimizer)
        with saving_without_copies(optimizer):  # one data-parallel rank: no gathered copies of the state
            opt_sd = optimizer.sharded_state_dict(
                model_sharded_state_dict(chunks), is_loading=False, metadata=OPTIMIZER_METADATA
            )
        with _writers_die_with_us():
            dc.save({"optimizer": opt_sd}, str(tmp / OPTIMIZER_DIR))
    (tmp / RNG_DIR / f"rank_{rank:05d}.json").write_text(json.dumps(rng))
    if rank == 0:
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if hf_dir is not None:
            copy_hf_side_files(hf_dir, tmp / HF_DIR)


def save(
    chunks: Sequence[torch.nn.Module],
    target: CheckpointStore | str | Path,
    step: int,
    *,
    optimizer: Any = None,
    scheduler: Any = None,
    extra: dict | None = None,
    hf_dir: str | Path | None = None,
) -> Path:
    """Save checkpoint `step` on every rank; returns the committed directory.

    `target` is a `CheckpointStore` (the run's root: `step_N` dir, `latest`, retention) or a path (exactly
    that directory, committed atomically: an existing one is replaced only once the new one is complete).
    `chunks` may be DDP-wrapped. `extra` and the scheduler's `state_dict()` must be JSON-serializable.
    `hf_dir` copies the HF config and tokenizer files in, so the checkpoint converts back on its own.
    """
    meta = {
        "format": FORMAT,
        "step": step,
        "layout": _layout(len(chunks)),
        "model": _model_signature(chunks),
        "has_optimizer": optimizer is not None,
        "scheduler": None if scheduler is None else _json_or_raise(scheduler.state_dict(), "the scheduler state"),
        "extra": _json_or_raise(dict(extra or {}), "extra"),
    }
    if isinstance(target, CheckpointStore):
        ctx, final = target.writing(step), target.path_for(step)
    else:
        final = Path(target)
        ctx = atomic_checkpoint_dir(final, step, is_writer=_rank() == 0, all_ok=all_ranks_ok)
    with ctx as tmp:
        _write_checkpoint(tmp, chunks, optimizer, meta, hf_dir)
    return final


# --- load ----------------------------------------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint `Metadata` (dataclasses, enums, torch.Size, dtypes) and nothing else."""

    _ALLOWED: ClassVar[dict[str, set[str] | None]] = {
        "torch.distributed.checkpoint.metadata": None,  # any class defined there: all plain records
        "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "collections": {"OrderedDict"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        names = self._ALLOWED.get(module, set())
        if "." not in name and (name in names if names is not None else True):
            obj = super().find_class(module, name)
            if names is not None or (isinstance(obj, type) and obj.__module__ == module):
                return obj
        raise UnsafeCheckpointError(f"refusing to unpickle {module}.{name} from checkpoint metadata")


def check_pickles_safe(dcp_dir: Path) -> None:
    """Raise `UnsafeCheckpointError` unless every pickle megatron/torch will read from `dcp_dir` is benign."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        with open(dcp_dir / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if (dcp_dir / "common.pt").is_file():
            torch.load(dcp_dir / "common.pt", map_location="cpu", weights_only=True)
    except UnsafeCheckpointError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise UnsafeCheckpointError(f"{dcp_dir}: cannot read its metadata safely: {e}") from e
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{dcp_dir}: object {index.fqn} is stored transformed; cannot verify it")
        with open(dcp_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        try:
            torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UnsafeCheckpointError(f"{dcp_dir}: object {index.fqn} is not a plain-tensor pickle: {e}") from e


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest valid checkpoint of a store root; clear errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise NoCheckpointError(f"checkpoint path {path} does not exist")
    if (path / MANIFEST).is_file() or (path / META).is_file():
        return path
    store = CheckpointStore(path, is_writer=False, clean_stale=False)
    if store.steps() or store.head() is not None:
        found = store.latest_valid()
        if found is None:
            raise NoCheckpointError(f"no complete, valid checkpoint under {path} (all are partial or corrupt)")
        return found.path
    raise CorruptCheckpointError(
        f"{path} is neither a checkpoint (no {MANIFEST} marker: partial write?) nor a checkpoint root"
    )


def read_meta(ckpt_dir: Path) -> dict:
    try:
        meta = json.loads((ckpt_dir / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{ckpt_dir / META} is missing or unreadable: {e}") from e
    if meta.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{ckpt_dir} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _check_signature(saved: dict, chunks, ckpt_dir: Path) -> None:
    current = _model_signature(chunks)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, model {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointMismatchError(f"checkpoint {ckpt_dir} does not fit this model: " + "; ".join(diffs))


def _dc_load(sharded: dict, dcp_dir: Path, strict: bool) -> dict:
    from megatron.core import dist_checkpointing as dc
    from megatron.core.dist_checkpointing.validation import StrictHandling

    check_pickles_safe(dcp_dir)
    handling = StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL
    try:
        return dc.load(sharded, str(dcp_dir), strict=handling)
    except Exception as e:
        text = str(e)
        if "shape mismatch" in text or "Missing keys" in text or "Unexpected keys" in text:
            raise CheckpointMismatchError(f"{dcp_dir} does not fit the model: {text}") from e
        raise


def _restore_rng(ckpt_dir: Path, saved_layout: dict, num_chunks: int) -> bool:
    current = _layout(num_chunks)
    saved_layout = {"cp": 1, "ep": 1, **saved_layout}  # saved before actor.context_parallel / expert_parallel
    if current != saved_layout:
        warnings.warn(
            f"RNG states not restored: {ckpt_dir} was saved with layout {saved_layout}, this run is {current}",
            stacklevel=3,
        )
        return False
    set_rng_state(json.loads((ckpt_dir / RNG_DIR / f"rank_{_rank():05d}.json").read_text()))
    return True


def load(
    chunks: Sequence[torch.nn.Module],
    ckpt_dir: str | Path,
    *,
    optimizer: Any = None,
    scheduler: Any = None,
    strict: bool = True,
    restore_rng: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint (dir, or a store root: its newest valid one) into `chunks` [+ optimizer, scheduler].

    Any TP/PP/DP layout loads a checkpoint saved with any other (dist-checkpointing reshards); RNG states
    are restored only when the layout is the same. Call on every rank.
    """
    path = resolve_checkpoint(ckpt_dir)
    verify_checkpoint_dir(path)
    meta = read_meta(path)
    _check_signature(meta["model"], chunks, path)
    if optimizer is not None and not meta["has_optimizer"]:
        raise CheckpointMismatchError(f"{path} holds no optimizer state (saved without one); load it without")
    loaded = _dc_load(model_sharded_state_dict(chunks), path / MODEL_DIR, strict)
    for key, chunk in zip(_model_keys(len(chunks)), chunks, strict=True):
        ma.unwrap(chunk).load_state_dict(loaded[key], strict=strict)
    if optimizer is not None:
        _init_adam_state(optimizer)
        opt_sd = optimizer.sharded_state_dict(
            model_sharded_state_dict(chunks), is_loading=True, metadata=OPTIMIZER_METADATA
        )
        _load_optimizer(optimizer, _dc_load({"optimizer": opt_sd}, path / OPTIMIZER_DIR, strict)["optimizer"])
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    rng_restored = restore_rng and _restore_rng(path, meta["layout"], len(chunks))
    return LoadedCheckpoint(
        step=int(meta["step"]), extra=meta["extra"], path=path, layout=meta["layout"], rng_restored=rng_restored
    )
