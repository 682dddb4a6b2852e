"""build_data: eval sets held out of training (the chain_sum overlap trap), reports, errors naming the config key."""

from __future__ import annotations

import json
import logging

import pytest

from lcot_mega.config.schema import DataConfig
from lcot_mega.data import build_data, generator_seed, normalize_problem

pytest.importorskip("reasoning_gym")

TINY_SUMS = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1"
"""Single-digit a +/- b: only 200 distinct questions, so an independently generated eval set overlaps training."""


def _file(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_eval_questions_never_appear_in_training_even_when_the_task_repeats_itself(char_tok):
    import reasoning_gym

    cfg = DataConfig(train=[TINY_SUMS], eval=[TINY_SUMS], gym_train_size=500, gym_eval_size=40)
    stream, evals = build_data(cfg, char_tok, seed=1)
    eval_questions = {normalize_problem(p.text) for p in evals["chain_sum"]}
    train_questions = {normalize_problem(p.text) for p in stream.prompts}
    assert len(eval_questions) == 40 and len(stream) == 500
    assert not eval_questions & train_questions
    train_report = next(r for r in stream.report if r.split == "train")
    assert train_report.held_out > 0 and train_report.kept == 500
    # the trap it avoids: the same generator, unfiltered, repeats most eval questions
    raw = reasoning_gym.create_dataset(
        "chain_sum", seed=generator_seed("chain_sum", "train", 1), size=500, min_terms=2, max_terms=2, max_digits=1
    )
    assert len({normalize_problem(x["question"]) for x in raw} & eval_questions) > 30


def test_a_task_too_small_for_the_sizes_asked_is_warned_about(char_tok, caplog):
    cfg = DataConfig(train=[TINY_SUMS], eval=[TINY_SUMS], gym_train_size=100, gym_eval_size=250)
    with caplog.at_level(logging.WARNING, logger="lcot_mega.data.build"):
        stream, evals = build_data(cfg, char_tok, seed=1)
    assert len(evals["chain_sum"]) < 200 and 0 < len(stream) < 100
    assert "data.eval[0]: only" in caplog.text and "distinct questions in 1000 draws" in caplog.text
    assert "data.train[0]: only" in caplog.text and "were eval questions" in caplog.text


def test_eval_set_is_the_same_for_every_training_seed(char_tok):
    cfg = DataConfig(train=[TINY_SUMS], eval=[TINY_SUMS], gym_train_size=50, gym_eval_size=20)
    (s1, e1), (s2, e2) = build_data(cfg, char_tok, seed=1), build_data(cfg, char_tok, seed=2)
    assert e1 == e2
    assert s1.prompts != s2.prompts
    assert build_data(cfg, char_tok, seed=1)[0].prompts == s1.prompts
    assert s1.prompts[0].uid.startswith("chain_sum/seed1/") and e1["chain_sum"][0].uid.startswith("chain_sum/eval/")


def test_eval_files_hold_out_training_file_rows_with_other_whitespace(tmp_path, char_tok):
    train = _file(tmp_path, "train.jsonl", [{"prompt": "1 +  1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}])
    ev = _file(tmp_path, "bench.jsonl", [{"prompt": "1 + 1\n", "answer": "2", "solution": "two"}])
    stream, evals = build_data(DataConfig(train=[train], eval=[ev]), char_tok, seed=0)
    assert [p.text for p in stream.prompts] == ["2+2"]
    assert list(evals) == ["bench"] and evals["bench"][0].uid == "bench/0"
    report = {r.split: r for r in stream.report}
    assert (report["train"].loaded, report["train"].held_out, report["train"].kept) == (2, 1, 1)
    assert "1 held out as eval questions" in report["train"].summary()


def test_sources_concatenate_and_keep_solutions(tmp_path, chat_tok):
    a = _file(tmp_path, "a.jsonl", [{"prompt": "x", "answer": "1", "solution": "because"}])
    b = _file(tmp_path, "b.jsonl", [{"prompt": "y", "answer": "2"}])
    cfg = DataConfig(train=[a, b, TINY_SUMS], gym_train_size=5, prompt_template="Q {problem}", shuffle=False)
    stream, evals = build_data(cfg, chat_tok, seed=0)
    assert evals == {}
    assert [p.source for p in stream.next_prompts(7)] == ["a", "b"] + ["chain_sum"] * 5
    assert stream.prompts[0].text == "<user>Q x<assistant>"
    assert stream.solution("a/0") == "because" and stream.solution("b/0") is None


def test_same_named_sources_are_told_apart(tmp_path, char_tok):
    (tmp_path / "x").mkdir()
    a = _file(tmp_path, "set.jsonl", [{"prompt": "x", "answer": "1"}])
    b = _file(tmp_path / "x", "set.jsonl", [{"prompt": "y", "answer": "2"}])
    _, evals = build_data(DataConfig(eval=[a, b]), char_tok, seed=0)
    assert list(evals) == [a, b]


def test_too_long_prompts_are_counted_and_a_source_left_empty_is_an_error(tmp_path, char_tok):
    f = _file(tmp_path, "f.jsonl", [{"prompt": "a" * 10, "answer": "1"}, {"prompt": "b" * 3, "answer": "2"}])
    stream, _ = build_data(DataConfig(train=[f], max_prompt_len=5), char_tok, seed=0)
    assert len(stream) == 1 and stream.report[0].too_long == 1
    with pytest.raises(ValueError, match=r"data\.train\[0\] = '.*f\.jsonl': no prompts left: all 2 prompts are longer"):
        build_data(DataConfig(train=[f], max_prompt_len=2), char_tok, seed=0)
    with pytest.raises(ValueError, match=r"no prompts left: every question is also in an eval set"):
        build_data(DataConfig(train=[f], eval=[f]), char_tok, seed=0)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DataConfig(train=["data/none.jsonl"]), r"^data\.train\[0\]: data/none\.jsonl: no such file"),
        (DataConfig(eval=["reasoning_gym:chain_sum?digits=2"]), r"^data\.eval\[0\]: .*has no argument 'digits'"),
        (DataConfig(train=["prompts.txt"]), r"^data\.train\[0\] = 'prompts\.txt': not a prompt file"),
        (DataConfig(prompt_template="Solve."), r"must contain \{problem\}"),
    ],
)
def test_errors_name_the_config_entry(char_tok, cfg, message):
    with pytest.raises(ValueError, match=message):
        build_data(cfg, char_tok, seed=0)
