"""The record every prompt source produces before rendering: a problem, its gold answer, and maybe a solution."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem as a source yields it, before the prompt template, chat template and tokenizer run."""

    uid: str
    """Stable id: source name + position (or the file's own `uid`)."""
    problem: str
    """The problem text that replaces `{problem}` in data.prompt_template."""
    answer: str
    """Gold answer the verifier compares against."""
    source: str
    """Task or data-set name, for per-source metrics."""
    solution: str | None = None
    """An offline correct solution (for injection into hard groups), when the source has one."""


def normalize_problem(text: str) -> str:
    """The form two problems are compared in for held-out filtering and dedupe: whitespace runs collapsed."""
    return " ".join(text.split())


@dataclass(frozen=True)
class SourceReport:
    """What the builder did with one source of data.train / data.eval (logged at start, kept for metrics)."""

    split: str
    """"train" or "eval"."""
    name: str
    """Source name: file stem or reasoning-gym task (the key of its eval set)."""
    spec: str
    """The entry as written in the config."""
    loaded: int
    """Problems read or generated."""
    held_out: int
    """Training problems dropped (or not generated) because the same question is in an eval set."""
    too_long: int
    """Prompts skipped as longer than data.max_prompt_len tokens."""
    kept: int
    """Prompts that made it into the stream or eval set."""

    def summary(self) -> str:
        return (
            f"data.{self.split} {self.name}: {self.kept} prompts ({self.loaded} loaded, {self.held_out} held out"
            f" as eval questions, {self.too_long} longer than data.max_prompt_len) from {self.spec}"
        )
