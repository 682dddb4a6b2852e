"""SFT examples: rows rendered and split into prompt and response ids as documented, bad rows named by file and
line, long examples left out and counted, held-out split and epoch order seeded and resumable."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lcot_mega.config import SftConfig
from lcot_mega.sft.data import EpochSampler, SftDataError, load_sft_data, total_steps

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)
"""A chat template over the character tokenizer: each turn is <u>/<a>/<s> + content + </s>."""


@pytest.fixture(scope="module")
def tokenizer(char_tok):
    return char_tok


@pytest.fixture(scope="module")
def chat_tokenizer(char_tok):
    tok = copy.deepcopy(char_tok)
    tok.chat_template = TEMPLATE
    return tok


def _write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_response_rows_without_template_end_with_eos(tmp_path, tokenizer):
    f = _write(tmp_path / "a.jsonl", [{"prompt": "1+2=", "response": "3"}])
    data = load_sft_data(SftConfig(train=[f], chat_template=False), tokenizer, seed=0)
    (e,) = data.train
    assert e.prompt_ids == _ids(tokenizer, "1+2=")  # this tokenizer adds no BOS of its own
    assert e.response_ids == [*_ids(tokenizer, "3"), tokenizer.eos_token_id]


def test_chat_rows_train_the_last_assistant_turn_with_its_end_of_turn(tmp_path, chat_tokenizer):
    rows = [
        {"prompt": "1+2=", "response": "3"},
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        },
    ]
    data = load_sft_data(SftConfig(train=[_write(tmp_path / "c.jsonl", rows)]), chat_tokenizer, seed=0)
    first, second = data.train
    assert first.prompt_ids == _ids(chat_tokenizer, "<u>1+2=</s><a>")
    assert first.response_ids == _ids(chat_tokenizer, "3</s>")  # the end-of-turn is trained: the model learns to stop
    assert second.prompt_ids == _ids(chat_tokenizer, "<s>S</s><u>Q</s><a>")
    assert second.response_ids == _ids(chat_tokenizer, "A</s>")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x"}, r"c\.jsonl:2: a row needs string 'prompt' and 'response' fields"),
        ({"prompt": "x", "response": ""}, "the response is empty"),
        ({"messages": [{"role": "user", "content": "x"}]}, "the last message must be the assistant's"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, r"messages\[0\] must be an object"),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, chat_tokenizer, row, message):
    f = _write(tmp_path / "c.jsonl", [{"prompt": "a", "response": "b"}, row])
    with pytest.raises(SftDataError, match=message):
        load_sft_data(SftConfig(train=[f]), chat_tokenizer, seed=0)


def test_a_template_less_tokenizer_is_refused_with_the_key_to_change(tmp_path, tokenizer):
    f = _write(tmp_path / "a.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(SftDataError, match=r"set sft\.chat_template=false"):
        load_sft_data(SftConfig(train=[f]), tokenizer, seed=0)


def test_long_examples_are_left_out_and_counted_never_cut(tmp_path, tokenizer):
    rows = [{"prompt": "ab", "response": "c" * n} for n in (1, 5, 9)]  # 3 + n + 1 tokens
    data = load_sft_data(
        SftConfig(train=[_write(tmp_path / "a.jsonl", rows)], max_tokens=9, chat_template=False), tokenizer, 0
    )
    assert [len(e.response_ids) for e in data.train] == [2, 6]
    assert "2 examples (1 longer than sft.max_tokens = 9 left out)" in data.report[0]
    with pytest.raises(SftDataError, match="no example fits"):
        load_sft_data(
            SftConfig(train=[_write(tmp_path / "b.jsonl", rows[2:])], max_tokens=9, chat_template=False), tokenizer, 0
        )


def test_eval_fraction_holds_out_a_seeded_share(tmp_path, tokenizer):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    cfg = SftConfig(train=[_write(tmp_path / "a.jsonl", rows)], eval_fraction=0.3, chat_template=False)
    a, b, c = (load_sft_data(cfg, tokenizer, seed) for seed in (1, 1, 2))
    assert len(a.train) == 7 and len(a.eval) == 3
    assert a.eval == b.eval and a.eval != c.eval
    assert not {tuple(e.prompt_ids) for e in a.eval} & {tuple(e.prompt_ids) for e in a.train}
    with pytest.raises(SftDataError, match="holds out none"):
        load_sft_data(SftConfig(train=cfg.train, eval_fraction=0.05, chat_template=False), tokenizer, 0)


def test_steps_cover_the_epochs():
    assert total_steps(10, SftConfig(epochs=1.0, batch_size=4)) == 3
    assert total_steps(10, SftConfig(epochs=2.5, batch_size=4)) == 7


def test_epochs_are_seeded_permutations_and_the_position_resumes():
    s = EpochSampler(5, seed=3)
    batches = [s.next_batch(3) for _ in range(4)]  # 12 indices: epochs 0, 1 and two of epoch 2
    flat = [i for b in batches for i in b]
    assert sorted(flat[:5]) == sorted(flat[5:10]) == list(range(5)) and flat[:5] != flat[5:10]
    assert s.epoch == 2 and s.progress == pytest.approx(2.4)
    again = EpochSampler(5, seed=3)
    again.next_batch(3)
    state = again.state_dict()
    resumed = EpochSampler(5, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(3) for _ in range(3)] == batches[1:]
    with pytest.raises(SftDataError, match="resume with the same data and seed"):
        EpochSampler(6, seed=3).load_state_dict(state)
