"""Train/rollout consistency: how far the rollout engine's log-probs are from the actor's on the same tokens.

After a correct weight sync both sides score the same policy, so the gap is numerical noise (fp32: ~1e-6;
bf16: ~1e-2). A growing gap means stale or corrupted engine weights, or a sampling/logit-processing mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.protocol import RolloutEngine


def logprob_gap(rollout_logprobs: Sequence[torch.Tensor], actor_logprobs: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean and max |rollout - actor| log-prob over all response tokens of a batch (0 when there are none).

    Both lists hold one [response_len] tensor per sequence, in the same order.
    """
    if len(rollout_logprobs) != len(actor_logprobs):
        raise ValueError(f"{len(rollout_logprobs)} rollout sequences but {len(actor_logprobs)} actor sequences")
    diffs = []
    for i, (r, a) in enumerate(zip(rollout_logprobs, actor_logprobs, strict=True)):
        r, a = torch.as_tensor(r, dtype=torch.float32), torch.as_tensor(a, dtype=torch.float32)
        if r.shape != a.shape:
            raise ValueError(f"sequence {i}: rollout log-probs {tuple(r.shape)}, actor log-probs {tuple(a.shape)}")
        diffs.append((r - a.to(r.device)).abs().flatten().cpu())
    gap = torch.cat(diffs) if diffs else torch.zeros(0)  # [tokens]
    if gap.numel() == 0:
        return {"rollout/logp_gap_mean": 0.0, "rollout/logp_gap_max": 0.0}
    return {"rollout/logp_gap_mean": float(gap.mean()), "rollout/logp_gap_max": float(gap.max())}


@torch.inference_mode()
def engine_logprobs(engine: RolloutEngine, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
    """Teacher-forced [response_len] log-probs (temperature 1, no truncation) of `response_ids` after `prompt_ids`.

    The protocol has no scoring call: the embedded engine is scored through its transformers model. An SGLang
    engine will score with `/generate` (`max_new_tokens=0`, `return_logprob=True`, `logprob_start_len` at the
    prompt's end) and read `input_token_logprobs`.
    """
    if not isinstance(engine, EmbeddedEngine):
        raise NotImplementedError(f"teacher-forced scoring is not implemented for {type(engine).__name__}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: the first response token would have no context")
    model = engine._model  # the engine's own forward: the weights it samples from
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], dtype=torch.long, device=engine.device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # [R, V]
    targets = torch.tensor(list(response_ids), dtype=torch.long, device=logits.device)
    return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0].cpu()
