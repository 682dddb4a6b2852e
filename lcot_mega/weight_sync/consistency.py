"""Train/rollout consistency: how far the rollout engine's log-probs are from the actor's on the same tokens.

After a correct weight sync both sides score the same policy, so the gap is numerical noise (fp32: ~1e-6;
bf16: ~1e-2). A growing gap means stale or corrupted engine weights, or a sampling/logit-processing mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
