"""The contract between the stages of an RL step: prompts, sampled responses, groups and batches.

Every stage reads and writes these types and nothing else; see DESIGN.md ("The step"). Per-sample
scalars live on `Sample`; the pure tensor math in `lcot_mega.algo` sees them through
`Batch.tensors()` and writes its results back with `Batch.set_*`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch


class SampleStatus(enum.Enum):
    """How a response ended, as the rollout engine reported it (SGLang `finish_reason.type`)."""

    COMPLETED = "completed"  # stopped on EOS or a stop string/id
    TRUNCATED = "truncated"  # hit max_new_tokens (SGLang "length")
    ABORTED = "aborted"  # cancelled: surplus of dynamic sampling, dead server, shutdown


@dataclass(frozen=True)
class Prompt:
    """One problem as it is sent to the rollout engine."""

    uid: str
    """Stable id of the problem (data position + source), used for per-problem analysis."""
    text: str
    """The prompt as rendered (chat template applied)."""
    answer: str
    """Gold answer the verifier compares against."""
    token_ids: tuple[int, ...] = ()
    """Tokenized `text`; empty until the tokenizer has run."""
    source: str = ""
    """Task or data-set name, for per-source metrics."""


@dataclass
class Sample:
    """One response to a prompt, with everything later stages attach to it."""

    prompt: Prompt
    response_ids: list[int]
    response_text: str = ""
    rollout_logprobs: list[float] | None = None
    """Log-probs of the sampled tokens under the distribution the engine sampled from."""
    status: SampleStatus = SampleStatus.COMPLETED
    weight_version: int = 0
    """Version of the policy weights that produced this sample (bumped on every sync)."""
    reward: float = 0.0
    correct: bool = False
    advantage: float = 0.0
    offline: bool = False
    """True for an injected offline solution (not sampled from the policy, Mu et al. 2025 sec. 4)."""
    token_versions: list[int] | None = None
    """Per token, the weights version that sampled it, for a response continued across syncs (partial rollout);
    None when `weight_version` sampled every token. `weight_version` is then the oldest of them."""
    routed_experts: torch.Tensor | None = None
    """A mixture of experts with `actor.routing_replay: rollout`: the engine's top-k experts per token and MoE layer
    (`Completion.routed_experts`, a [prompt + response - 1, layers * top_k] tensor), replayed by the actor."""

    def __post_init__(self) -> None:
        if self.rollout_logprobs is not None and len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(
                f"rollout_logprobs has {len(self.rollout_logprobs)} entries"
                f" for {len(self.response_ids)} response tokens"
            )
        if self.token_versions is not None and len(self.token_versions) != len(self.response_ids):
            raise ValueError(
                f"token_versions has {len(self.token_versions)} entries for {len(self.response_ids)} response tokens"
            )

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.prompt.token_ids

    @property
    def response_len(self) -> int:
        return len(self.response_ids)

    @property
    def truncated(self) -> bool:
        return self.status is SampleStatus.TRUNCATED


@dataclass
class Group:
    """The G responses to one prompt: the unit of group-relative advantages."""

    prompt: Prompt
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        for s in self.samples:
            if s.prompt is not self.prompt and s.prompt != self.prompt:
                raise ValueError(f"sample of prompt {s.prompt.uid!r} placed in group of {self.prompt.uid!r}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def accuracy(self) -> float:
        return sum(s.correct for s in self.samples) / len(self.samples) if self.samples else 0.0


@dataclass(frozen=True)
class BatchTensors:
    """Per-sample scalars of a batch as flat tensors, in `Batch.samples` order."""

    rewards: torch.Tensor  # [N] float32
    correct: torch.Tensor  # [N] bool
    group_ids: torch.Tensor  # [N] int64, index of the sample's group in the batch
    lengths: torch.Tensor  # [N] int64, response tokens
    truncated: torch.Tensor  # [N] bool
    offline: torch.Tensor  # [N] bool


@dataclass
class Batch:
    """The groups of one RL step."""

    groups: list[Group] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g.samples]

    def __iter__(self) -> Iterator[Sample]:
        for g in self.groups:
            yield from g.samples

    def tensors(self) -> BatchTensors:
        samples = self.samples
        return BatchTensors(
            rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
            correct=torch.tensor([s.correct for s in samples], dtype=torch.bool),
            group_ids=torch.tensor([gi for gi, g in enumerate(self.groups) for _ in g.samples], dtype=torch.long),
            lengths=torch.tensor([s.response_len for s in samples], dtype=torch.long),
            truncated=torch.tensor([s.truncated for s in samples], dtype=torch.bool),
            offline=torch.tensor([s.offline for s in samples], dtype=torch.bool),
        )

    def set_rewards(self, rewards: torch.Tensor | Sequence[float]) -> None:
        for s, r in zip(self.samples, self._checked(rewards), strict=True):
            s.reward = float(r)

    def set_advantages(self, advantages: torch.Tensor | Sequence[float]) -> None:
        for s, a in zip(self.samples, self._checked(advantages), strict=True):
            s.advantage = float(a)

    def filter(self, keep: torch.Tensor | Sequence[bool]) -> Batch:
        """A new batch with the samples where `keep` is true; groups left empty are dropped."""
        it = iter(self._checked(keep))
        groups = []
        for g in self.groups:
            kept = [s for s in g.samples if bool(next(it))]
            if kept:
                groups.append(Group(g.prompt, kept))
        return Batch(groups)

    def _checked(self, values: torch.Tensor | Sequence) -> list:
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        if len(values) != len(self):
            raise ValueError(f"got {len(values)} values for a batch of {len(self)} samples")
        return values
