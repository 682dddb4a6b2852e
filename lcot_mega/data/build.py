"""data.* -> the training PromptStream and the eval sets, with every eval question held out of training."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcot_mega.config.schema import DataConfig
from lcot_mega.data.files import FILE_SUFFIXES, is_file_source, load_problem_file
from lcot_mega.data.gym import GymSpec, GymStats, generate_problems, generator_seed, is_gym_source, parse_gym_spec
from lcot_mega.data.problems import Problem, SourceReport, normalize_problem
from lcot_mega.data.stream import PromptStream
from lcot_mega.data.templates import check_template, render_prompts
from lcot_mega.types import Prompt

log = logging.getLogger(__name__)


def build_data(cfg: DataConfig, tokenizer: Any, seed: int) -> tuple[PromptStream, dict[str, list[Prompt]]]:
    """The training stream (shuffled by `seed`, i.e. trainer.seed) and the eval sets by source name.

    Eval sets are built first; any training problem whose whitespace-normalized text is an eval question is
    dropped (reasoning-gym training generators skip it and draw another). Per-source counts are logged and kept
    in `stream.report`. Errors name the config entry, e.g. `data.train[1]: file.jsonl:7: missing field 'answer'`.
    """
    check_template(cfg.prompt_template)
    reports: list[SourceReport] = []
    eval_sets: dict[str, list[Prompt]] = {}
    train: list[Prompt] = []
    solutions: dict[str, str] = {}
    for source in _sources(cfg, seed):
        prompts, report = _render(source, tokenizer, cfg)
        reports.append(report)
        if source.split == "eval":
            eval_sets[source.name] = prompts
            continue
        train.extend(prompts)
        solutions.update((p.uid, p.solution) for p in source.problems if p.solution)
    for report in reports:
        log.info(report.summary())
    return PromptStream(train, seed=seed, shuffle=cfg.shuffle, solutions=solutions, report=reports), eval_sets


def load_problems(cfg: DataConfig, seed: int) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """The problems a run with trainer.seed `seed` trains on, in source order, and its eval sets by source name,
    before any template or tokenizer: what `build_data` renders (prompts too long for data.max_prompt_len are
    still here). For tools that pair a run's own problems with something, e.g. offline solutions for injection."""
    train: list[Problem] = []
    eval_sets: dict[str, list[Problem]] = {}
    for source in _sources(cfg, seed):
        if source.split == "eval":
            eval_sets[source.name] = source.problems
        else:
            train.extend(source.problems)
    return train, eval_sets


@dataclass(frozen=True)
class _Source:
    """One entry of data.eval or data.train, loaded: its problems and how many were held out as eval questions."""

    split: str
    key: str
    spec: str
    name: str
    problems: list[Problem]
    held_out: int


def _sources(cfg: DataConfig, seed: int) -> Iterator[_Source]:
    """The eval sources, then the training sources less every eval question."""
    held_out: set[str] = set()
    for key, spec, name in _named(cfg.eval, "data.eval"):
        problems, _ = _load(spec, key, name, cfg, split="eval", seed=seed, exclude=())
        held_out.update(normalize_problem(p.problem) for p in problems)
        yield _Source("eval", key, spec, name, problems, 0)
    for key, spec, name in _named(cfg.train, "data.train"):
        problems, dropped = _load(spec, key, name, cfg, split="train", seed=seed, exclude=held_out)
        yield _Source("train", key, spec, name, problems, dropped)


def _named(specs: Sequence[str], field: str) -> list[tuple[str, str, str]]:
    """(config key, spec, source name); the name is the file stem or gym task, or the whole spec when two collide."""
    names = [_short_name(s) for s in specs]
    return [
        (f"{field}[{i}]", spec, name if names.count(name) == 1 else spec)
        for i, (spec, name) in enumerate(zip(specs, names, strict=True))
    ]


def _short_name(spec: str) -> str:
    if is_gym_source(spec):
        return spec.split(":", 1)[1].split("?", 1)[0]
    return Path(spec).stem


def _load(
    spec: str, key: str, name: str, cfg: DataConfig, *, split: str, seed: int, exclude: Collection[str]
) -> tuple[list[Problem], int]:
    """The source's problems, less those in `exclude`, and how many were excluded."""
    try:
        if is_gym_source(spec):
            return _load_gym(parse_gym_spec(spec), key, name, cfg, split=split, seed=seed, exclude=exclude)
        if is_file_source(spec):
            loaded = load_problem_file(spec, name)
            problems = [p for p in loaded if normalize_problem(p.problem) not in exclude]
            return problems, len(loaded) - len(problems)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    raise ValueError(f"{key} = {spec!r}: not a prompt file ({', '.join(FILE_SUFFIXES)}) nor reasoning_gym:TASK")


def _load_gym(
    gym: GymSpec, key: str, name: str, cfg: DataConfig, *, split: str, seed: int, exclude: Collection[str]
) -> tuple[list[Problem], int]:
    """Training: gym_train_size problems from a trainer.seed-derived seed, eval questions skipped. Eval:
    gym_eval_size distinct problems from a fixed seed, the same in every run."""
    if split == "train":
        problems, stats = generate_problems(
            gym,
            name=name,
            seed=generator_seed(gym.task, "train", seed),
            size=cfg.gym_train_size,
            uid_tag=f"seed{seed}",
            exclude=exclude,
        )
        if len(problems) < cfg.gym_train_size:
            log.warning(
                f"{key}: only {len(problems)} training problems (data.gym_train_size = {cfg.gym_train_size}) in"
                f" {stats.drawn} draws of {gym.spec}: {stats.held_out} were eval questions; widen the task's arguments"
            )
        return problems, stats.held_out
    problems, stats = gym_eval_problems(gym, name, cfg.gym_eval_size)
    if len(problems) < cfg.gym_eval_size:
        log.warning(
            f"{key}: only {len(problems)} distinct questions in {stats.drawn} draws of {gym.spec}"
            f" (data.gym_eval_size = {cfg.gym_eval_size}); the task has few distinct questions"
        )
    return problems, 0


def gym_eval_problems(gym: GymSpec, name: str, size: int) -> tuple[list[Problem], GymStats]:
    """A reasoning-gym source's held-out eval set: up to `size` distinct problems from a fixed seed, the same in
    every run and for every trainer.seed; uids `name/eval/idx`. Used by data.eval and by named benchmarks."""
    return generate_problems(
        gym, name=name, seed=generator_seed(gym.task, "eval"), size=size, uid_tag="eval", distinct=True
    )


def _render(source: _Source, tokenizer: Any, cfg: DataConfig) -> tuple[list[Prompt], SourceReport]:
    prompts, too_long = render_prompts(
        source.problems,
        tokenizer,
        template=cfg.prompt_template,
        apply_chat_template=cfg.apply_chat_template,
        max_prompt_len=cfg.max_prompt_len,
    )
    total = len(source.problems) + source.held_out
    report = SourceReport(source.split, source.name, source.spec, total, source.held_out, too_long, len(prompts))
    if not prompts:
        if too_long:
            why = f"all {too_long} prompts are longer than data.max_prompt_len = {cfg.max_prompt_len} tokens"
        else:
            why = "every question is also in an eval set (data.eval); widen the task or lower data.gym_eval_size"
        raise ValueError(f"{source.key} = {source.spec!r}: no prompts left: {why}")
    return prompts, report
