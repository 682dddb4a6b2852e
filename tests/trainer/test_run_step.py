"""One `driver.run_step` in process, with a scripted engine, grader and actor: what the actor is handed and what the
step reports when `algo.mask_truncated` leaves truncated responses out of the loss (DAPO's overlong filtering)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from lcot_mega.checkpoint.store import CheckpointStore
from lcot_mega.cluster.runtime import Runtime
from lcot_mega.config import Config, config_from_dict
from lcot_mega.guards import Guard, GuardLog
from lcot_mega.reward.grader import GradeResult
from lcot_mega.rollout.protocol import Completion, SamplingParams
from lcot_mega.trainer.driver import run_step
from lcot_mega.trainer.recovery import Recovery
from lcot_mega.trainer.respond import Watch
from lcot_mega.types import Prompt, SampleStatus

DONE, CUT = SampleStatus.COMPLETED, SampleStatus.TRUNCATED
MAX_NEW = 4
PROMPT = Prompt("p0", "q", "1", token_ids=(1, 2))


class ScriptedEngine:
    """Every prompt gets the same responses: (answer text, length, status) each; token t of response i is 10 i + t."""

    def __init__(self, responses: list[tuple[str, int, SampleStatus]]) -> None:
        self.responses = responses

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        return [
            [
                Completion([10 * i + t for t in range(n)], [-0.5] * n, status, text=text)
                for i, (text, n, status) in enumerate(self.responses)
            ]
            for _ in prompt_ids
        ]

    def abort(self) -> None:
        pass


class ExactGrader:
    """Reward 1 when the response is the gold answer, else 0 (no worker processes)."""

    def grade_batch(self, responses: Sequence[str], answers: Sequence[str]) -> list[GradeResult]:
        return [GradeResult(float(r == a), r == a) for r, a in zip(responses, answers, strict=True)]


class RecordingActor:
    """Keeps the TrainBatch of every update; the update always succeeds."""

    def __init__(self) -> None:
        self.batches: list = []

    def train_step(self, batch) -> dict[str, float]:
        self.batches.append(batch)
        return {"actor/update_ok": 1.0, "actor/response_tokens": float(sum(len(r) for r in batch.response_ids))}

    def sync_weights(self, version: int) -> dict[str, float]:
        return {}


def _step(tmp_path, responses, **algo) -> tuple[RecordingActor, dict]:
    cfg: Config = config_from_dict(
        {
            "rollout": {"n_samples": len(responses), "max_new_tokens": MAX_NEW},
            "trainer": {"prompts_per_step": 1},
            "algo": algo,
        }
    )
    actor = RecordingActor()
    rt = Runtime(actor=actor, engine=ScriptedEngine(responses), tokenizer=None)  # type: ignore[arg-type]
    store = CheckpointStore(tmp_path / "checkpoints", 3, clean_stale=False)
    watch = Watch(Guard(cfg.guards), Recovery(cfg.guards), GuardLog(tmp_path), store)
    try:
        metrics, _ = run_step(rt, ExactGrader(), lambda k: [PROMPT] * k, cfg, 1, watch)  # type: ignore[arg-type]
    finally:
        watch.log.close()
    return actor, metrics


def test_the_actor_gets_every_response_but_the_truncated_one_and_the_step_still_counts_it(tmp_path):
    responses = [("1", 2, DONE), ("0", 3, DONE), ("0", MAX_NEW, CUT), ("1", 1, DONE)]
    actor, metrics = _step(tmp_path, responses, mask_truncated=True)
    (batch,) = actor.batches
    assert [r[0] for r in batch.response_ids] == [0, 10, 30]
    assert [len(x) for x in batch.rollout_logprobs] == [2, 3, 1] and len(batch.prompt_ids) == 3
    # GRPO over all four rewards 1001 (the truncated 0 included): +-0.866, not the 101 of the three that train
    assert batch.advantages == pytest.approx([0.8660254, -0.8660254, 0.8660254], abs=1e-5)
    assert metrics["select/masked_truncated"] == 1.0 and metrics["actor/response_tokens"] == 6.0
    assert metrics["rollout/truncated_frac"] == 0.25 and metrics["reward/accuracy"] == 0.5  # over all four
    assert metrics["actor/skipped"] == 0.0


def test_without_the_option_the_truncated_response_trains(tmp_path):
    responses = [("1", 2, DONE), ("0", 3, DONE), ("0", MAX_NEW, CUT), ("1", 1, DONE)]
    actor, metrics = _step(tmp_path, responses)
    assert [r[0] for r in actor.batches[0].response_ids] == [0, 10, 20, 30]
    assert metrics["select/masked_truncated"] == 0.0


def test_a_step_whose_every_response_is_truncated_skips_the_update_and_says_why(tmp_path, capsys):
    responses = [("1", MAX_NEW, CUT), ("0", MAX_NEW, CUT), ("0", MAX_NEW, CUT)]
    actor, metrics = _step(tmp_path, responses, mask_truncated=True)
    assert actor.batches == []
    assert metrics["actor/skipped"] == 1.0 and metrics["select/masked_truncated"] == 3.0
    assert metrics["rollout/truncated_frac"] == 1.0 and metrics["reward/accuracy"] == pytest.approx(1 / 3)
    out = capsys.readouterr().out
    assert (
        "step 1: no sample left to train on after selection, 3 truncated ones masked out by algo.mask_truncated" in out
    )
