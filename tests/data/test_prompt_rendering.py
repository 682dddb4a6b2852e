"""Rendering: prompt template, then the chat template with the generation prompt, then token ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from lcot_mega.data import Problem, render_prompts, render_texts

SMOLLM2 = Path(__file__).resolve().parents[2] / "runs/models/SmolLM2-135M-Instruct"
TEMPLATE = "{problem} Put the final answer within \\boxed{}."


def _problems(*texts):
    return [Problem(uid=f"t/{i}", problem=t, answer=str(i), source="t") for i, t in enumerate(texts)]


def test_chat_template_wraps_the_filled_template_and_ends_with_the_generation_prompt(chat_tok):
    prompts, skipped = render_prompts(
        _problems("1+2=?"), chat_tok, template=TEMPLATE, apply_chat_template=True, max_prompt_len=1000
    )
    (p,) = prompts
    assert skipped == 0
    assert p.text == "<user>1+2=? Put the final answer within \\boxed{}.<assistant>"
    assert p.token_ids == tuple(chat_tok(p.text, add_special_tokens=False)["input_ids"])
    assert (p.uid, p.answer, p.source) == ("t/0", "0", "t")


def test_plain_text_without_a_chat_template_or_when_turned_off(char_tok, chat_tok):
    for tok, apply in ((char_tok, True), (chat_tok, False)):
        (p,), _ = render_prompts(
            _problems("7-2"), tok, template="Q: {problem}", apply_chat_template=apply, max_prompt_len=99
        )
        assert p.text == "Q: 7-2"
        assert len(p.token_ids) == len("Q: 7-2")  # one token per character, nothing added


def test_template_must_name_the_problem(char_tok):
    with pytest.raises(ValueError, match=r"data\.prompt_template = 'Solve it' must contain \{problem\}"):
        render_texts(["x"], char_tok, template="Solve it", apply_chat_template=True)


def test_prompts_over_max_prompt_len_are_skipped_and_counted(char_tok):
    problems = _problems("a" * 5, "b" * 6, "c" * 7, "d")
    prompts, skipped = render_prompts(
        problems, char_tok, template="{problem}", apply_chat_template=True, max_prompt_len=6
    )
    assert [p.uid for p in prompts] == ["t/0", "t/1", "t/3"] and skipped == 1
    assert render_prompts([], char_tok, template="{problem}", apply_chat_template=True, max_prompt_len=6) == ([], 0)


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="SmolLM2 tokenizer not materialized")
def test_smollm2_chat_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    (p,), _ = render_prompts(_problems("2 + 3 ="), tok, template=TEMPLATE, apply_chat_template=True, max_prompt_len=512)
    assert p.text.startswith("<|im_start|>system\n")
    assert p.text.endswith(
        "<|im_start|>user\n2 + 3 = Put the final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert p.token_ids[0] == im_start and p.token_ids.count(im_start) == 3  # parsed as special tokens, no BOS added
