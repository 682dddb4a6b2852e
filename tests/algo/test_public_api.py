"""The documented public API of lcot_mega.algo exists under the names the issue and ALGORITHMS.md use."""

import lcot_mega.algo as algo

ISSUE_NAMES = [
    "group_advantages",
    "relative_length_reward",
    "zero_advantage_groups",
    "select_by_polarity",
    "positive_weight",
    "policy_loss",
    "kl_penalty",
    "entropy_from_logits",
    "off_policy_weights",
    "offpolicy_shaped_loss",
    "offline_injection_mask",
    "batch_metrics",
]


def test_issue_names_are_exported_and_callable():
    for name in ISSUE_NAMES:
        assert callable(getattr(algo, name)), name
    assert set(algo.__all__) >= set(ISSUE_NAMES)


def test_registries_list_the_built_ins():
    assert {"grpo", "drgrpo", "rloo", "reinforce_pp"} <= set(algo.available_advantages())
    assert {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"} <= set(
        algo.available_aggregations()
    )
    assert set(algo.available_corrections()) == {
        "none",
        "tis",
        "seq_tis",
        "mis",
        "seq_mis",
        "icepop",
        "geo_mask",
        "decoupled",
    }
