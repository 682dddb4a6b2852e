"""The package's shape stays what README's Layout promises: stages in folders, fault drills out of production."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lcot_mega"
INJECTOR = PACKAGE / "trainer" / "faults.py"
INJECTION_NAMES = re.compile(r"debug\.inject|nan_loss|arm_save_fault|sharpen|before_commit|inject_engine_fault")


def test_at_most_three_loose_modules_at_the_top_of_the_package():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 3, loose


def test_only_the_injector_and_the_config_schema_know_fault_injection():
    """Production classes carry no injection hooks: the config declares `debug.inject`, the wrapper uses it."""
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path == INJECTOR or path.parent.name == "config":
            continue
        hits = [line.strip() for line in path.read_text().splitlines() if INJECTION_NAMES.search(line)]
        hits = [h for h in hits if "import inject_faults" not in h and "inject_faults(" not in h]
        if hits:
            offenders[str(path.relative_to(PACKAGE))] = hits
    assert offenders == {}


def test_no_attribute_forwarding_proxies_in_the_package():
    """One typed surface per component: a class whose `__getattr__` forwards to another object hides what it
    offers (module-level lazy exports, and cpu_compat's null CUDA stream, are not forwarding)."""
    forwarding = []
    for path in PACKAGE.rglob("*.py"):
        for body in re.findall(r"^    def __getattr__\(.*?(?=^    \S|^\S|\Z)", path.read_text(), re.M | re.S):
            if "getattr(" in body:
                forwarding.append(str(path.relative_to(PACKAGE)))
    assert forwarding == []
