"""Supervised examples for `lcot-mega sft`: rows read from files, rendered and tokenized into prompt and response.

A row is `{"prompt": str, "response": str}` or `{"messages": [{"role", "content"}, ...]}` ending with an
assistant turn. With the chat template (`sft.chat_template`), the prompt is everything the template renders before
the last assistant turn (with the generation prompt), and the response is the rest of the full rendering: the
assistant's text and the template's end-of-turn tokens, which the model must learn to emit to stop. Without it,
prompt and response are tokenized as given and EOS is appended to the response. Only the last assistant turn is
trained (earlier turns are context), which is the single-turn cold-start format of the study.

Prompt and response are tokenized separately, as the RL loop sees them (prompt ids, then sampled ids), so the
supervised model learns the token boundary it will generate from.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lcot_mega.config import SftConfig
from lcot_mega.data.files import read_rows


class SftDataError(ValueError):
    """A data file or row `lcot-mega sft` cannot use; the message names the file and line."""


@dataclass(frozen=True)
class SftExample:
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class SftData:
    train: list[SftExample]
    eval: list[SftExample]
    report: list[str] = field(default_factory=list)
    """One line per file: examples kept and left out (too long)."""


def messages_of(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The row as chat messages; the last one is the assistant turn to train on."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise SftDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise SftDataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise SftDataError(f"{where}: the last message must be the assistant's (got {messages[-1]['role']!r})")
        if len(messages) < 2:
            raise SftDataError(f"{where}: an assistant message needs a prompt before it")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        fields = ", ".join(sorted(row)) or "none"
        raise SftDataError(f"{where}: a row needs string 'prompt' and 'response' fields, or 'messages' (has: {fields})")
    if not response:
        raise SftDataError(f"{where}: the response is empty: there is nothing to train on")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def tokenize_example(messages: list[dict[str, str]], tokenizer: Any, chat_template: bool, where: str) -> SftExample:
    """Prompt and response token ids of one example (see the module docstring)."""
    if chat_template:
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise SftDataError(
                f"{where}: the chat template renders the conversation without the prompt as its prefix, so the"
                " response tokens cannot be told apart; set sft.chat_template=false and pass rendered text"
            )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    else:
        prompt_text = "".join(m["content"] for m in messages[:-1])
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is None:
            raise SftDataError("the tokenizer has no EOS token to end the responses with")
        response_ids = [*response_ids, tokenizer.eos_token_id]
    if not prompt_ids:
        raise SftDataError(f"{where}: the prompt tokenizes to nothing: the first response token has no context")
    return SftExample(list(prompt_ids), list(response_ids))


def load_examples(files: Sequence[str], tokenizer: Any, cfg: SftConfig) -> tuple[list[SftExample], list[str]]:
    """Every usable example of `files`, in file order, and one report line per file; too-long ones are counted."""
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise SftDataError(
            "sft.chat_template is true but the tokenizer has no chat template; set sft.chat_template=false"
        )
    examples, report = [], []
    for path in files:
        try:
            rows = list(read_rows(path))
        except ValueError as e:
            raise SftDataError(str(e)) from None
        kept = long = 0
        for where, row in rows:
            example = tokenize_example(messages_of(row, where), tokenizer, cfg.chat_template, where)
            if example.tokens > cfg.max_tokens:
                long += 1
                continue
            examples.append(example)
            kept += 1
        report.append(f"{path}: {kept} examples ({long} longer than sft.max_tokens = {cfg.max_tokens} left out)")
        if not kept:
            raise SftDataError(f"{path}: no example fits in sft.max_tokens = {cfg.max_tokens}")
    return examples, report


def load_sft_data(cfg: SftConfig, tokenizer: Any, seed: int) -> SftData:
    """Training and held-out examples: `sft.eval` files, else a seeded `sft.eval_fraction` of the training ones."""
    if not cfg.train:
        raise SftDataError("sft.train names no file: lcot-mega sft needs (prompt, response) examples")
    train, report = load_examples(cfg.train, tokenizer, cfg)
    if cfg.eval:
        held, eval_report = load_examples(cfg.eval, tokenizer, cfg)
        return SftData(train, held, report + eval_report)
    n_eval = math.floor(len(train) * cfg.eval_fraction)
    if cfg.eval_fraction and n_eval == 0:
        raise SftDataError(f"sft.eval_fraction = {cfg.eval_fraction} of {len(train)} examples holds out none")
    if n_eval >= len(train):
        raise SftDataError(f"sft.eval_fraction = {cfg.eval_fraction} leaves no training example")
    held_out = set(random.Random(seed).sample(range(len(train)), n_eval))
    kept = [e for i, e in enumerate(train) if i not in held_out]
    report.append(f"held out {n_eval} of {len(train)} examples for evaluation (sft.eval_fraction)")
    return SftData(kept, [train[i] for i in sorted(held_out)], report)


def total_steps(n_examples: int, cfg: SftConfig) -> int:
    """Optimizer steps of the run: ceil(epochs x examples / batch_size)."""
    return max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size))


class EpochSampler:
    """Example indices, batch after batch: each epoch a fresh permutation from (seed, epoch); a batch may span
    the end of one epoch and the start of the next. Its position (`state_dict`) is saved in each checkpoint, so a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("EpochSampler needs at least one example")
        self.n, self.seed = n, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[int]:
        out: list[int] = []
        while len(out) < size:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(out), self.n - self.cursor)
            out += self._order[self.cursor : self.cursor + take]
            self.cursor += take
        return out

    @property
    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.cursor / self.n

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise SftDataError(
                f"the checkpoint's run had {state['n']} training examples and seed {state['seed']}; this one has"
                f" {self.n} and {self.seed}: resume with the same data and seed, or start a new --run-dir"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
