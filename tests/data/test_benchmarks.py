"""load_benchmark: files by suffix, reasoning-gym held-out sets identical to data.eval's, named sets, errors."""

from __future__ import annotations

import json
import sys

import pytest

from lcot_mega.config.schema import DataConfig
from lcot_mega.data import Problem
from lcot_mega.data.benchmarks import BENCHMARKS, load_benchmark, register_benchmark
from lcot_mega.data.build import _load_gym
from lcot_mega.data.gym import parse_gym_spec

GYM = "reasoning_gym:chain_sum?min_terms=2&max_terms=3&max_digits=2"


def test_a_file_is_named_by_its_stem_and_shuffled_with_the_seed(tmp_path):
    p = tmp_path / "gpqa_diamond.jsonl"
    row = {"problem": "Q", "choices": ["right", "w1", "w2", "w3"], "answer": "right", "uid": "rec1"}
    p.write_text(json.dumps(row) + "\n")
    # Random("42:rec1") orders the options [2, 3, 1, 0]: right ends up last (see test_choices.py)
    assert load_benchmark(str(p)) == (
        "gpqa_diamond",
        [Problem("gpqa_diamond/rec1", "Q\n\n(A) w2\n(B) w3\n(C) w1\n(D) right", "D", "gpqa_diamond")],
    )
    name, other = load_benchmark(str(p), choice_seed=0)
    assert name == "gpqa_diamond" and other[0].problem != "Q\n\n(A) w2\n(B) w3\n(C) w1\n(D) right"


def test_gym_spec_gives_exactly_the_training_eval_set():
    pytest.importorskip("reasoning_gym")
    name, problems = load_benchmark(GYM, gym_size=30)
    cfg = DataConfig(gym_eval_size=30)
    expected, _ = _load_gym(parse_gym_spec(GYM), "data.eval[0]", "chain_sum", cfg, split="eval", seed=3, exclude=())
    assert name == "chain_sum"
    assert problems == expected
    assert len(problems) == 30 and len({p.problem for p in problems}) == 30
    assert problems[0].uid == "chain_sum/eval/0"


@pytest.mark.parametrize("spec", ["champion", "data/x.csv", "gpqa"])
def test_unknown_names_list_the_known_ones_and_the_accepted_forms(spec):
    with pytest.raises(ValueError, match=r"unknown benchmark .*known name \(champ\).*\.jsonl.*reasoning_gym:TASK"):
        load_benchmark(spec)


def test_missing_file_is_an_error():
    with pytest.raises(ValueError, match=r"nope\.jsonl: no such file"):
        load_benchmark("nope.jsonl")


def test_registered_loaders_get_the_choice_seed():
    seen = []

    @register_benchmark("tiny-test-set")
    def _tiny(*, choice_seed: int) -> list[Problem]:
        seen.append(choice_seed)
        return [Problem("tiny-test-set/0", "1+1?", "2", "tiny-test-set")]

    try:
        assert load_benchmark("tiny-test-set", choice_seed=5) == ("tiny-test-set", _tiny(choice_seed=5))
        assert seen == [5, 5]
        with pytest.raises(ValueError, match="already registered"):
            register_benchmark("tiny-test-set")(_tiny)
    finally:
        del BENCHMARKS["tiny-test-set"]


def test_champ_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "champ_dataset", None)  # makes `import champ_dataset` raise ImportError
    with pytest.raises(ValueError, match=r"pip install champ-dataset"):
        load_benchmark("champ")


def test_champ_has_its_270_problems():
    champ_dataset = pytest.importorskip("champ_dataset")
    name, problems = load_benchmark("champ")
    assert name == "champ"
    assert len(problems) == 270  # CHAMP v0: 270 problems in 5 categories
    assert len({p.uid for p in problems}) == 270
    assert all(p.problem and p.answer and p.source == "champ" for p in problems)
    raw = champ_dataset.load("v0").problems["P_Combinatorics_1"]
    first = next(p for p in problems if p.uid == "champ/P_Combinatorics_1")
    assert (first.problem, first.answer) == (raw.text, "239")
