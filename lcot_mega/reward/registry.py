"""Reward functions by name: the built-in `math` and `exact`, and user functions.

A reward function is `fn(response, answer) -> bool | float`; it may also take the keyword-only
extraction options `require_think_close` and `fallbacks` (they are passed only to a function whose
signature names them or has `**kwargs`). Register one with `@register_reward("name")`, or name it by
a dotted path `"package.module:function"` (or `"package.module.function"`). The `Grader` runs these
in worker processes, which import the function's module themselves: a function must live at the top
level of an importable module.

The built-ins run math-verify with its own timeouts off: call them only where something else bounds
their time (the `Grader`'s workers), never on untrusted input in the trainer's process.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from lcot_mega.reward.extract import extract_answer

__all__ = [
    "EXTRACTION_OPTIONS",
    "MAX_ANSWER_CHARS",
    "REWARD_FUNCTIONS",
    "RewardFn",
    "available_rewards",
    "exact_reward",
    "math_reward",
    "register_reward",
    "resolve_reward",
    "reward_kwargs",
]

RewardFn = Callable[..., bool | float]

MAX_ANSWER_CHARS = 2000
"""Longer extracted answers score incorrect unparsed: math-verify's parse time grows steeply with size."""
EXTRACTION_OPTIONS = ("require_think_close", "fallbacks")

_REGISTRY: dict[str, RewardFn] = {}
REWARD_FUNCTIONS: Mapping[str, RewardFn] = MappingProxyType(_REGISTRY)
"""Read-only view of the registered reward functions by name."""


def register_reward(name: str, *, override: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator that registers a reward function under `name`; re-registering needs `override=True`."""
    if not name or ":" in name or "." in name:
        raise ValueError(f"reward name {name!r} must be non-empty without ':' or '.' (those mark dotted paths)")

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn and not override:
            raise ValueError(f"reward function {name!r} is already registered; pass override=True to replace it")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def resolve_reward(name_or_path: str) -> RewardFn:
    """The reward function for a registered name or a dotted path; ValueError if there is none."""
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    if ":" in name_or_path or "." in name_or_path:
        return _import_function(name_or_path)
    names = available_rewards()
    close = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.0)
    hint = f"; closest: {close[0]!r}" if close else ""
    raise ValueError(
        f"unknown reward function {name_or_path!r}; registered: {names}{hint} (or give a dotted path 'module:function')"
    )


def _import_function(path: str) -> RewardFn:
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not (module_name and sep and attr):
        raise ValueError(f"reward path {path!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward path {path!r}: cannot import module {module_name!r} ({err})") from err
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"reward path {path!r}: module {module_name!r} has no function {attr!r}")
    return fn


@functools.cache
def _accepted_options(fn: RewardFn) -> frozenset[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: give them the bare call
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return frozenset(EXTRACTION_OPTIONS)
    return frozenset(p.name for p in params if p.name in EXTRACTION_OPTIONS and p.kind is not p.POSITIONAL_ONLY)


def reward_kwargs(fn: RewardFn, **options: object) -> dict[str, object]:
    """The extraction options that `fn` accepts, by keyword (others are dropped)."""
    accepted = _accepted_options(fn)
    return {k: v for k, v in options.items() if k in accepted}


@register_reward("math")
def math_reward(
    response: str, answer: str, *, require_think_close: bool = False, fallbacks: Sequence[str] = ()
) -> bool:
    """Extract the last boxed answer and check it against the gold `answer` with math-verify.

    Both sides go through math-verify boxed: it parses bare LaTeX gold such as `\\frac{1}{2}` or
    `(0, 1]` wrongly or not at all. math-verify's timeouts (signal.alarm, main thread only) are off.
    """
    extracted = extract_answer(response, require_think_close=require_think_close, fallbacks=fallbacks)
    if not extracted or len(extracted) > MAX_ANSWER_CHARS:  # None or empty: nothing to grade
        return False
    import math_verify  # lazily: sympy is heavy, and only grader workers need it

    pred = math_verify.parse(f"\\boxed{{{extracted}}}", parsing_timeout=None)
    return bool(pred) and math_verify.verify(_parse_gold(answer), pred, timeout_seconds=None)


@functools.lru_cache(maxsize=1024)
def _parse_gold(answer: str) -> list:
    """Parsed gold answer; cached because the G responses of a group share one gold answer."""
    import math_verify

    gold = answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"
    return math_verify.parse(gold, parsing_timeout=None)


@register_reward("exact")
def exact_reward(
    response: str, answer: str, *, require_think_close: bool = False, fallbacks: Sequence[str] = ()
) -> bool:
    """Extracted answer equals the gold `answer` as strings, surrounding whitespace ignored."""
    extracted = extract_answer(response, require_think_close=require_think_close, fallbacks=fallbacks)
    return extracted is not None and extracted.strip() == answer.strip()
