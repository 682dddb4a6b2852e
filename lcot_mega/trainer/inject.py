"""Offline-solution injection (`algo.injection`; Mu et al. 2025, "data efficiency", and their code).

In a group whose accuracy is <= `algo.injection.alpha`, incorrect sampled responses are replaced by the problem's
correct offline solution (`algo.offline_injection_mask`: earliest incorrect ones first, one per solution the
problem has, never a truncated one); the group is graded again (rewards and shaping terms over the mixed group) and its
advantages follow from the new rewards when the step computes them. The actor trains the injected tokens with the
policy-shaping loss -A p / (p + gamma) (`algo.losses.offpolicy_shaped_loss`, LUFFY), the sampled ones as usual.

Solutions come from the training data (the `solution` field of prompt files, docs/DATA.md). Each is tokenized
once, when first used, as the response the model would have written: its text, then the tokenizer's EOS (a chat
model's end-of-turn token), so the model also learns to stop. A solution longer than `rollout.max_new_tokens` is
skipped, as the study skipped truncated ones; one the grader does not find correct is never trained on: its group
gets its sampled responses back, and the solution is not offered again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lcot_mega.algo.injection import offline_injection_mask
from lcot_mega.config import Config, ConfigError
from lcot_mega.reward.grader import Grader
from lcot_mega.trainer.collect import score_groups
from lcot_mega.types import Batch, Group, Sample, SampleStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineSolution:
    """A solution as the actor trains it: the text the grader reads and the response token ids."""

    text: str
    token_ids: tuple[int, ...]


@dataclass
class InjectionCounts:
    """What injection did in one collection (the `injection/*` rollout metrics)."""

    replaced: int = 0
    """Sampled responses replaced by an offline solution (and kept so: graded correct)."""
    groups: int = 0
    """Groups that received at least one."""
    rejected: int = 0
    """Solutions the grader did not find correct: their groups got their samples back."""

    def __add__(self, other: InjectionCounts) -> InjectionCounts:
        return InjectionCounts(
            self.replaced + other.replaced, self.groups + other.groups, self.rejected + other.rejected
        )

    def metrics(self) -> dict[str, float]:
        return {
            "injection/replaced": float(self.replaced),
            "injection/groups": float(self.groups),
            "injection/rejected": float(self.rejected),
        }


class OfflineInjector:
    """Replaces incorrect responses of hard groups by offline solutions (see the module docstring)."""

    def __init__(self, solutions: Mapping[str, str], tokenizer, cfg: Config) -> None:
        if not solutions:
            raise ConfigError(
                [
                    "algo.injection.enabled = true, but no training prompt has an offline solution: give data.train a"
                    " prompt file whose rows carry a `solution` field (docs/DATA.md), e.g. from"
                    " examples/study/cold_start_data.py --for rl"
                ]
            )
        self.texts, self.tokenizer, self.cfg = solutions, tokenizer, cfg
        self.alpha, self.max_len = cfg.algo.injection.alpha, cfg.rollout.max_new_tokens
        self._tokenized: dict[str, OfflineSolution | None] = {}
        self.too_long: set[str] = set()
        self.rejected: set[str] = set()

    def solution(self, uid: str) -> OfflineSolution | None:
        """The usable solution of a prompt: None without one, when it is too long, or once the grader refused it."""
        if uid in self.rejected or uid not in self.texts:
            return None
        if uid not in self._tokenized:
            text = self.texts[uid]
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if self.tokenizer.eos_token_id is not None:
                ids.append(int(self.tokenizer.eos_token_id))
            usable = len(ids) <= self.max_len
            if not usable:
                self.too_long.add(uid)
                log.warning("offline solution of %s has %d tokens > rollout.max_new_tokens; skipped", uid, len(ids))
            self._tokenized[uid] = OfflineSolution(text, tuple(ids)) if usable else None
        return self._tokenized[uid]

    def inject(self, groups: list[Group], grader: Grader) -> InjectionCounts:
        """Replace, in place, the incorrect responses of `groups`' hard groups (graded already) and grade them again."""
        if not groups:
            return InjectionCounts()
        t = Batch(groups).tensors()
        solutions = [self.solution(g.prompt.uid) for g in groups]
        available = torch.tensor([int(s is not None) for s in solutions], dtype=torch.long)  # [groups]
        mask = offline_injection_mask(t.correct, t.group_ids, self.alpha, available, t.truncated).tolist()  # [N]
        originals: dict[int, list[Sample]] = {}
        flat = 0
        for gi, group in enumerate(groups):
            for si, sample in enumerate(group.samples):
                if mask[flat + si]:
                    originals.setdefault(gi, list(group.samples))
                    group.samples[si] = _offline_sample(sample, solutions[gi])
            flat += len(group)
        if not originals:
            return InjectionCounts()
        touched = [groups[gi] for gi in originals]
        score_groups(touched, grader, self.cfg)
        counts = InjectionCounts()
        refused = []
        for gi, samples in originals.items():
            group = groups[gi]
            offline = [s for s in group.samples if s.offline]
            if all(s.correct for s in offline):
                counts.replaced += len(offline)
                counts.groups += 1
                continue
            log.warning("offline solution of %s is not graded correct; it is not injected", group.prompt.uid)
            self.rejected.add(group.prompt.uid)
            counts.rejected += 1
            group.samples[:] = samples
            refused.append(group)
        score_groups(refused, grader, self.cfg)  # the sampled responses' own rewards and shaping again
        return counts


def _offline_sample(replaced: Sample, solution: OfflineSolution) -> Sample:
    return Sample(
        prompt=replaced.prompt,
        response_ids=list(solution.token_ids),
        response_text=solution.text,
        rollout_logprobs=None,
        status=SampleStatus.COMPLETED,
        weight_version=replaced.weight_version,
        offline=True,
    )
