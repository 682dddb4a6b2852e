"""Load a script of tools/ or examples/ as a module, as it would run: the project's scripts are not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_script(relpath: str, name: str | None = None) -> ModuleType:
    """Execute ROOT/relpath as module `name` (default: the file's stem), registered in sys.modules first so that
    its dataclasses can look their module up while it runs."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
