"""Metric key names: the `group/name` shape every sink accepts, and the stable keys of docs/METRICS.md.

Keys are checked when logged so a typo fails in a test instead of opening a new, silently empty chart.
"""

from __future__ import annotations

import re

__all__ = ["DOCUMENTED_KEYS", "KEY_PATTERN", "LABEL_KEYS", "check_key", "is_documented", "is_label", "key_segment"]

KEY_PATTERN = re.compile(r"[a-z0-9_@]+(?:/[a-z0-9_@]+)+")
"""`group/name` (more `/segments` allowed): lowercase letters, digits, `_` and `@`, no empty segment."""

_SEGMENT_CHARS = re.compile(r"[^a-z0-9_@]+")
_PLACEHOLDER = re.compile(r"<[a-z_]+>")

DOCUMENTED_KEYS: tuple[str, ...] = (
    # reward
    "reward/mean",
    "reward/accuracy",
    "reward/timeout_frac",
    "reward/shaped_frac",
    # advantages and selection (lcot_mega/algo/metrics.py)
    "adv/zero_frac_samples",
    "adv/zero_frac_groups",
    "adv/mean",
    "adv/abs_mean",
    "polarity/pos_count",
    "polarity/neg_count",
    "polarity/zero_count",
    "polarity/pos_share",
    "polarity/neg_share",
    "polarity/kept_pos_count",
    "polarity/kept_neg_count",
    "polarity/kept_zero_count",
    "polarity/kept_pos_share",
    "polarity/kept_neg_share",
    "select/kept_frac",
    "select/masked_truncated",
    # offline injection (lcot_mega/trainer/inject.py, trainer/update.py)
    "injection/replaced",
    "injection/groups",
    "injection/rejected",
    "injection/trained",
    "injection/token_share",
    "injection/adv_share",
    # rollout
    "rollout/zero_adv_frac",
    "rollout/response_len_mean",
    "rollout/truncated_frac",
    "rollout/repetition_frac",
    "rollout/engine_failures",
    "rollout/engine_failovers",
    "rollout/engine_restarts",
    "rollout/engines_live",
    "rollout/groups_per_kept_group",
    "rollout/rounds",
    "rollout/groups_generated",
    "rollout/shortfall",
    "rollout/staleness_mean",
    "rollout/staleness_max",
    "rollout/stale_dropped_groups",
    "rollout/dropped_groups_total",
    "rollout/rollback_dropped_groups",
    "rollout/windows",
    "rollout/carried_in_groups",
    "rollout/open_groups",
    "rollout/ready_groups",
    "rollout/span_dropped_groups",
    "rollout/multi_version_frac",
    "rollout/generated_tokens",
    "rollout/aborted_groups",
    "rollout/is_weight_mean",
    "rollout/is_capped_frac",
    "rollout/is_masked_frac",
    "rollout/logp_gap_mean",
    "rollout/logp_gap_max",
    # actor (lcot_mega/actor/train_step.py, lcot_mega/algo/losses.py)
    "actor/loss",
    "actor/pg_loss",
    "actor/kl_loss",
    "actor/entropy",
    "actor/clipfrac",
    "actor/clipfrac_upper",
    "actor/clipfrac_lower",
    "actor/dual_clipfrac",
    "actor/ppo_kl",
    "actor/approx_kl_k3",
    "actor/ratio_mean",
    "actor/ratio_max",
    "actor/response_tokens",
    "actor/grad_norm",
    "actor/lr",
    "actor/update_ok",
    "actor/updates",
    "actor/micro_batches",
    "actor/skipped",
    "actor/gate_skipped",
    # mixture of experts (lcot_mega/actor/routing.py)
    "moe/expert_load_max",
    "moe/router_entropy",
    "moe/router_entropy_max",
    "moe/replayed_fraction",
    "moe/replay_mismatch",
    "moe/aux_loss",
    "moe/z_loss",
    # stability guards (lcot_mega/guards, driver)
    "guard/action",
    "guard/reason",
    "guard/breaches",
    "guard/rollbacks",
    "guard/lr_scale",
    # data
    "data/epoch",
    # weight sync (lcot_mega/weight_sync/push.py)
    "sync/seconds",
    "sync/gb",
    "sync/gb_per_s",
    "sync/probe_max_diff",
    "sync/delta_sent_frac",
    "sync/delta_changed_frac",
    "sync/delta_fallbacks",
    "sync/servers",
    "sync/servers_restarted",
    # wall time
    "perf/step_s",
    "perf/rollout_s",
    "perf/train_s",
    "perf/sync_s",
    "perf/rollout_wait_s",
    "perf/rollout_ahead_s",
    "perf/rollout_tok_s",
    # evaluation
    "eval/<source>/accuracy",
    "eval/<source>/pass@<k>",
    "eval/<source>/accuracy_stderr",
    "eval/<source>/response_len_mean",
    "eval/<source>/truncated_frac",
    # sft
    "sft/loss",
    "sft/tokens",
    "sft/epoch",
    "sft/eval_loss",
    "sft/step_s",
    "sft/tokens_per_s",
)
"""Every key of docs/METRICS.md, in its order; `<source>` / `<k>` stand for one key segment
(a test checks that the document and this tuple agree)."""

LABEL_KEYS: frozenset[str] = frozenset({"guard/action", "guard/reason"})
"""Keys whose values are strings (labels), not numbers: JSONL keeps them, TensorBoard skips them."""


def _template_regex(template: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(template)
    return re.compile("[a-z0-9_@]+".join(re.escape(p) for p in parts))


_DOCUMENTED = frozenset(k for k in DOCUMENTED_KEYS if "<" not in k)
_TEMPLATES = tuple(_template_regex(k) for k in DOCUMENTED_KEYS if "<" in k)


def check_key(key: object) -> None:
    """Raise ValueError unless `key` is a `group/name` string (see KEY_PATTERN)."""
    if not isinstance(key, str) or KEY_PATTERN.fullmatch(key) is None:
        raise ValueError(
            f"metric key {key!r} must look like 'group/name': lowercase letters, digits, '_', '@', segments joined"
            " by '/' (e.g. 'reward/accuracy', 'eval/aime24/pass@8'); see docs/METRICS.md"
        )


def is_documented(key: str) -> bool:
    """True when `key` is one of DOCUMENTED_KEYS or fills one of its `<placeholder>` templates."""
    return key in _DOCUMENTED or any(t.fullmatch(key) for t in _TEMPLATES)


def is_label(key: str) -> bool:
    """True when `key` takes a string value (LABEL_KEYS)."""
    return key in LABEL_KEYS


def key_segment(name: str) -> str:
    """`name` (a data source such as 'MATH-500' or 'aime.2024') as one valid key segment ('math_500')."""
    segment = _SEGMENT_CHARS.sub("_", name.lower()).strip("_")
    if not segment:
        raise ValueError(f"{name!r} has no character usable in a metric key")
    return segment
