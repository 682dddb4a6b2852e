"""Evaluation sets by name or path: what `lcot-mega eval --data FILE_OR_NAME` turns into problems.

A `--data` value is a prompt file (.jsonl/.json/.parquet, docs/DATA.md), a `reasoning_gym:TASK?args` source
(the same held-out set that training's data.eval uses), or the name of a set shipped in a Python package
(`BENCHMARKS`; add one with `register_benchmark`). Nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from lcot_mega.data.build import gym_eval_problems
from lcot_mega.data.choices import DEFAULT_CHOICE_SEED
from lcot_mega.data.files import FILE_SUFFIXES, is_file_source, load_problem_file
from lcot_mega.data.gym import is_gym_source, parse_gym_spec
from lcot_mega.data.problems import Problem

log = logging.getLogger(__name__)

BenchmarkLoader = Callable[..., list[Problem]]
"""Called as `loader(choice_seed=...)`; returns the set's problems with uids `<name>/<id>`."""

BENCHMARKS: dict[str, BenchmarkLoader] = {}
"""Named offline sets: name -> loader."""


def register_benchmark(name: str) -> Callable[[BenchmarkLoader], BenchmarkLoader]:
    """Decorator adding a loader to `BENCHMARKS` under `name` (an existing name is an error)."""

    def deco(loader: BenchmarkLoader) -> BenchmarkLoader:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is already registered")
        BENCHMARKS[name] = loader
        return loader

    return deco


def load_benchmark(
    spec: str, *, gym_size: int = 200, choice_seed: int = DEFAULT_CHOICE_SEED
) -> tuple[str, list[Problem]]:
    """(benchmark name, problems) for a `--data` value: a prompt file (name = its stem), `reasoning_gym:TASK?args`
    (name = the task; `gym_size` distinct problems, as data.eval with data.gym_eval_size), or a name in
    `BENCHMARKS`. `choice_seed` shuffles the options of multiple-choice problems (42: the study's)."""
    if is_file_source(spec):
        name = Path(spec).stem
        return name, load_problem_file(spec, name, choice_seed=choice_seed)
    if is_gym_source(spec):
        gym = parse_gym_spec(spec)
        problems, stats = gym_eval_problems(gym, gym.task, gym_size)
        if len(problems) < gym_size:
            log.warning(f"{spec}: only {len(problems)} distinct questions in {stats.drawn} draws (wanted {gym_size})")
        return gym.task, problems
    if spec in BENCHMARKS:
        return spec, BENCHMARKS[spec](choice_seed=choice_seed)
    raise ValueError(
        f"unknown benchmark {spec!r}; use a known name ({', '.join(sorted(BENCHMARKS))}), a prompt file"
        f" ({', '.join(FILE_SUFFIXES)}; see docs/DATA.md), or reasoning_gym:TASK?args"
    )


@register_benchmark("champ")
def load_champ(*, choice_seed: int = DEFAULT_CHOICE_SEED) -> list[Problem]:
    """CHAMP's 270 competition-level problems (Mao et al., 2024; https://yujunmao1.github.io/CHAMP/) from the
    `champ-dataset` package; answers are free-form text, some of them sentences (docs/DATA.md)."""
    del choice_seed  # no multiple-choice problems
    try:
        import champ_dataset
    except ImportError:
        raise ValueError("benchmark 'champ' needs the champ-dataset package: pip install champ-dataset") from None
    dataset = champ_dataset.load("v0")
    return [
        Problem(uid=f"champ/{ident}", problem=p.text.strip(), answer=p.answer.strip(), source="champ")
        for ident, p in dataset.problems.items()
    ]
