"""docs/METRICS.md, DOCUMENTED_KEYS and the keys the code produces agree, so names cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lcot_mega.actor.train_step import metric_keys
from lcot_mega.algo import off_policy_weights, policy_loss
from lcot_mega.algo.metrics import KEEP_METRIC_KEYS, METRIC_KEYS
from lcot_mega.config import AlgoConfig
from lcot_mega.guards import Verdict
from lcot_mega.observe import DOCUMENTED_KEYS, KEY_PATTERN, LABEL_KEYS, check_key, is_documented, key_segment
from lcot_mega.trainer.inject import InjectionCounts
from lcot_mega.trainer.partial import METRIC_KEYS as PARTIAL_METRIC_KEYS
from lcot_mega.trainer.update import injection_share
from lcot_mega.weight_sync.consistency import logprob_gap
from lcot_mega.weight_sync.push import SyncReport

DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
# train_step sets these after the reduction (see lcot_mega/actor/train_step.py); "tokens" is internal and popped
TRAIN_STEP_EXTRA_KEYS = (
    "actor/response_tokens",
    "actor/grad_norm",
    "actor/lr",
    "actor/update_ok",
    "actor/micro_batches",
    "actor/gate_skipped",
)


def doc_keys() -> list[str]:
    """The key in the first cell of every table row."""
    return re.findall(r"^\| `([^`]+)` \|", DOC.read_text(), flags=re.MULTILINE)


def example(key: str) -> str:
    return key.replace("<source>", "math_500").replace("<k>", "8")


def test_doc_lists_exactly_the_documented_keys_in_order():
    assert doc_keys() == list(DOCUMENTED_KEYS)
    assert len(set(DOCUMENTED_KEYS)) == len(DOCUMENTED_KEYS)


@pytest.mark.parametrize("key", DOCUMENTED_KEYS)
def test_documented_key_is_a_valid_key(key):
    check_key(example(key))
    assert is_documented(example(key))


def produced_keys() -> set[str]:
    keys = set(METRIC_KEYS) | set(KEEP_METRIC_KEYS) | set(TRAIN_STEP_EXTRA_KEYS)
    for kl_coef in (0.0, 0.1):
        for with_is in (False, True):
            k = metric_keys(AlgoConfig(kl_coef=kl_coef), with_is)
            keys |= {*k.sums, *k.token_means, *k.policy_means, *k.maxes}
    keys -= {"tokens", "policy_tokens"}  # the denominators, divided out before logging
    keys |= set(InjectionCounts().metrics())
    keys |= set(injection_share(torch.ones(2), torch.tensor([True, False]), torch.ones(2), torch.ones(2, dtype=bool)))
    logp, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    keys |= set(policy_loss(logp, logp, torch.ones(1, 2), mask)[1])
    keys |= set(off_policy_weights(logp, logp, mask, "tis")[1])
    keys |= set(logprob_gap([torch.zeros(2)], [torch.zeros(2)]))
    keys |= set(SyncReport(seconds=1.0, bytes=10, buckets=1, probe_max_diff=0.0).metrics())
    keys |= set(Verdict(0).metrics())
    keys |= set(PARTIAL_METRIC_KEYS)
    return keys


def test_every_key_the_code_produces_is_documented():
    keys = produced_keys()
    assert len(keys) > 40
    assert sorted(k for k in keys if not is_documented(k)) == []


def test_labels_are_exactly_the_documented_rows_of_unit_label():
    label_rows = re.findall(r"^\| `([^`]+)` \|.*\| label \|[^|]*\|$", DOC.read_text(), flags=re.MULTILINE)
    assert sorted(label_rows) == sorted(LABEL_KEYS) == ["guard/action", "guard/reason"]


@pytest.mark.parametrize("key", ["eval/math_500/accuracy", "eval/aime24/pass@16"])
def test_templates_match_one_segment(key):
    assert is_documented(key)
    assert not is_documented(key.replace("eval/", "eval/a/"))


def test_key_segment_makes_source_names_usable():
    assert key_segment("MATH-500") == "math_500"
    assert key_segment(" aime.2024 ") == "aime_2024"
    assert KEY_PATTERN.fullmatch(f"eval/{key_segment('GSM8K (test)')}/accuracy")
    with pytest.raises(ValueError):
        key_segment("--")
