"""YAML + dotted overrides (OmegaConf) into the typed `Config`, with errors that name the key to fix.

OmegaConf parses the YAML, the `a.b=c` overrides and `${...}` interpolations; the typed walk below
checks every key and value against the dataclasses and collects all problems before failing, so a
run never starts on a config it did not understand. Values are never rewritten (an int given for a
float field is accepted as that number).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lcot_mega.config.fields import constraint_errors
from lcot_mega.config.schema import Config, cross_field_errors
from lcot_mega.utils.atomic_file import atomic_write


class ConfigError(ValueError):
    """A config that cannot be used; `problems` lists every offending key with what is allowed."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems))


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a recipe YAML (or only the defaults when `path` is None), apply `key=value` overrides, validate."""
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(p)!r} does not exist"])
        try:
            loaded = OmegaConf.load(p)
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError([f"{p}: not valid YAML: {e}"]) from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError([f"{p}: the top level of the config must be a mapping of sections"])
        layers.append(loaded)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError([f"override {item!r} must look like key=value (for example algo.polarity=negative)"])
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.to_container(OmegaConf.merge(*layers) if layers else OmegaConf.create(), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError([f"could not parse config or overrides: {e}"]) from None
    except yaml.YAMLError as e:  # an override's value is parsed as YAML: `key={a}` is a flow mapping
        problem = " ".join(str(e).split())
        raise ConfigError(
            [f"an override's value is not valid YAML ({problem}); quote it, e.g. 'key=\"{{problem}} ...\"'"]
        ) from None
    return config_from_dict(merged)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a `Config` from plain data (parsed YAML)."""
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if not problems:
        problems.extend(cross_field_errors(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def validation_errors(cfg: Config) -> list[str]:
    """What `load_config` would refuse in `cfg`: a Config built or changed in Python skips the loader's checks."""
    try:
        config_from_dict(config_to_dict(cfg))
    except ConfigError as e:
        return e.problems
    return []


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def _build(cls: type, data: Any, prefix: str, problems: list[str], base: Any = None) -> Any:
    """Instantiate dataclass `cls` from `data`, appending a message per bad key to `problems`.

    Keys missing from `data` keep `base`'s values (the parent field's own default, which may differ from the
    class defaults: each guards monitor has its own), else the class defaults."""
    where = prefix.rstrip(".") or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where} must be a mapping of keys, got {data!r} ({type(data).__name__})")
        return base if base is not None else cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            problems.append(_unknown_key_message(str(key), prefix, sorted(fields)))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            value = _build(hints[name], data[name], key + ".", problems, _field_default(f))
        else:
            value = _convert(hints[name], data[name], key, problems)
        if value is _INVALID:
            continue
        problems.extend(constraint_errors(key, value, dict(f.metadata)))
        kwargs[name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


_INVALID = object()


def _convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against type `tp`; returns the value (dataclasses built) or _INVALID."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", problems)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key} must be a list, got {value!r} ({type(value).__name__})")
            return _INVALID
        items = [_convert(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else items
    if _scalar_ok(tp, value):
        return float(value) if tp is float else value
    hint = ""
    if tp is str and isinstance(value, bool):  # YAML 1.1: off/on/no/yes/false/true are booleans unless quoted
        hint = f"; YAML reads an unquoted off/on/no/yes as a boolean: quote it ({key}=\"'off'\" on a command line)"
    problems.append(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}")
    return _INVALID


def _scalar_ok(tp: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return tp is bool  # bool is an int subclass; never accept True for a number
    if tp is float:
        return isinstance(value, int | float)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _unknown_key_message(key: str, prefix: str, valid: list[str]) -> str:
    full = prefix + key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    section = prefix.rstrip(".") or "the top level"
    return f"unknown config key {full!r}{hint} (valid keys in {section}: {', '.join(valid)})"
