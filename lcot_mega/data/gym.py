"""reasoning-gym sources: `reasoning_gym:TASK?arg=value&...` names a generator and its config.

Items are generated offline and deterministically: reasoning-gym seeds item `idx` with `Random(seed + idx)`,
so two seeds a few apart give shifted copies of the same items. Generator seeds are therefore hashed from
the split (and trainer.seed for training) so their index ranges never meet, and the builder still filters
every eval question out of training, because small tasks repeat questions (STACK-NOTES, chain_sum trap).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from lcot_mega.data.files import answer_text
from lcot_mega.data.problems import Problem, normalize_problem

GYM_PREFIX = "reasoning_gym:"
RESERVED_ARGS = {"seed": "trainer.seed", "size": "data.gym_train_size / data.gym_eval_size"}
DRAW_FACTOR = 4
"""Items drawn per item wanted, at most, when duplicates or held-out questions are skipped."""


@dataclass(frozen=True)
class GymSpec:
    """A parsed `reasoning_gym:TASK?args` source."""

    spec: str
    task: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GymStats:
    """What generating one source took: items drawn, and why some were not kept."""

    drawn: int
    held_out: int
    """Skipped because the question is in an eval set."""
    duplicates: int
    """Skipped because the question was already generated (eval sets are kept distinct)."""


def is_gym_source(spec: str) -> bool:
    return spec.startswith(GYM_PREFIX)


def parse_gym_spec(spec: str) -> GymSpec:
    """Parse and check `reasoning_gym:TASK?a=1&b=x` against the task's config class (ValueError names the problem).

    Values are read as the config field's type (int, float, bool: true/false, str), after %-decoding (`%20` is
    a space, `%26` an ampersand); unknown names get the closest matches.
    """
    datasets = _registry()
    body = spec[len(GYM_PREFIX) :]
    task, _, query = body.partition("?")
    if task not in datasets:
        close = difflib.get_close_matches(task, list(datasets), n=3, cutoff=0.5)
        hint = (
            f"did you mean {', '.join(map(repr, close))}?" if close else f"known tasks: {', '.join(sorted(datasets))}"
        )
        raise ValueError(f"{spec}: unknown reasoning-gym task {task!r}; {hint}")
    config_cls = datasets[task][1]
    hints = typing.get_type_hints(config_cls)
    args: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ValueError(f"{spec}: generator argument {item!r} must look like name=value")
        if key in args:
            raise ValueError(f"{spec}: generator argument {key!r} is given twice")
        if key in RESERVED_ARGS:
            raise ValueError(f"{spec}: {key!r} is set by {RESERVED_ARGS[key]}, not in the source")
        if key not in hints:
            allowed = [k for k in hints if k not in RESERVED_ARGS]
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{spec}: {task} has no argument {key!r}; {hint}its arguments: {', '.join(allowed)}")
        args[key] = _parse_value(unquote(raw), hints[key], f"{spec}: argument {key}")
    try:
        config = config_cls(**args, seed=0, size=1)
        if hasattr(config, "validate"):
            config.validate()
    except (AssertionError, ValueError, TypeError) as e:
        raise ValueError(f"{spec}: invalid generator arguments: {e}") from None
    return GymSpec(spec=spec, task=task, args=args)


def _parse_value(raw: str, tp: Any, where: str) -> Any:
    """`raw` as the field type `tp` (Optional unwrapped); fields of other types get the best scalar guess."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    readers = {bool: _read_bool, int: int, float: float, str: str}
    if tp in readers:
        try:
            return readers[tp](raw)
        except ValueError:
            raise ValueError(f"{where} = {raw!r} is not {_TYPE_NAMES[tp]}") from None
    for reader in (_read_bool, int, float):
        try:
            return reader(raw)
        except ValueError:
            pass
    return raw


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "text"}


def _read_bool(raw: str) -> bool:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    raise ValueError(raw)


def generator_seed(task: str, split: str, seed: int = 0) -> int:
    """A 40-bit generator seed for (task, split, seed): far apart, so `Random(seed + idx)` ranges never meet."""
    digest = hashlib.sha256(f"lcot-mega:{split}:{task}:{seed}".encode()).digest()
    return int.from_bytes(digest[:5], "big")


def generate_problems(
    gym: GymSpec,
    *,
    name: str,
    seed: int,
    size: int,
    uid_tag: str,
    exclude: Collection[str] = (),
    distinct: bool = False,
) -> tuple[list[Problem], GymStats]:
    """Up to `size` problems from generator seed `seed`, skipping questions in `exclude` (normalized text) and,
    with `distinct`, repeats; at most DRAW_FACTOR * size items are drawn. Uids are `name/uid_tag/idx`."""
    draws = size if not exclude and not distinct else DRAW_FACTOR * size
    dataset = _registry_module().create_dataset(gym.task, seed=seed, size=draws, **gym.args)
    problems: list[Problem] = []
    seen: set[str] = set()
    held_out = duplicates = drawn = 0
    for idx in range(draws):
        if len(problems) == size:
            break
        item = dataset[idx]
        drawn += 1
        key = normalize_problem(item["question"])
        if key in exclude:
            held_out += 1
            continue
        if distinct and key in seen:
            duplicates += 1
            continue
        seen.add(key)
        if item.get("answer") is None:
            raise ValueError(
                f"{gym.spec}: task {gym.task!r} gives no gold answer (it scores answers with its own function);"
                " use a task with a gold answer"
            )
        answer = answer_text(item["answer"], f"{gym.spec}: item {idx}")
        problems.append(Problem(uid=f"{name}/{uid_tag}/{idx}", problem=item["question"], answer=answer, source=name))
    return problems, GymStats(drawn=drawn, held_out=held_out, duplicates=duplicates)


def _registry_module() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError("reasoning_gym: sources need the reasoning-gym package: pip install reasoning-gym") from None
    return reasoning_gym


def _registry() -> dict[str, tuple[type, type]]:
    _registry_module()
    from reasoning_gym.factory import DATASETS

    return {k: v for k, v in DATASETS.items() if dataclasses.is_dataclass(v[1])}
