#!/usr/bin/env bash
# Zero-advantage accounting (Mu et al. 2025, data efficiency): dynamic sampling off (train on every group) vs drop
# (zero-advantage groups dropped, no refill: the study config's default, i.e. the polarity ablation's "both" run) vs
# refill (dropped groups replaced by new prompts, up to 4 rounds of generation), per seed; then the tables.
# REFILL=0 leaves the refill arm out (it generates up to 4x the rollouts per step).
# usage: bash examples/study/zero_advantage.sh [SEED ...]  (default: 1 2 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/study/common.sh
ensure_model
seeds=("$@")
if [ ${#seeds[@]} -eq 0 ]; then seeds=(1 2 3); fi
for seed in "${seeds[@]}"; do
    # training on all 64 samples in one micro-batch needs more than 24 GiB (the full-vocabulary logits of every
    # token): smaller micro-batches, the same update (one global loss denominator: lcot_mega/actor/train_step.py)
    train_and_eval "runs/study/zero_adv/off-seed$seed" algo.dynamic_sampling.mode="'off'" \
        actor.micro_batch_tokens=2048 trainer.seed="$seed"
    train_and_eval "runs/study/polarity/both-seed$seed" algo.polarity=both trainer.seed="$seed"
    same_run_as "runs/study/zero_adv/drop-seed$seed" "runs/study/polarity/both-seed$seed"
    if [ "${REFILL:-1}" = 1 ]; then
        train_and_eval "runs/study/zero_adv/refill-seed$seed" algo.dynamic_sampling.mode=drop \
            algo.dynamic_sampling.max_rounds=4 trainer.seed="$seed"
    fi
done
python examples/study/tables.py zero_adv runs/study
lcot-mega plot --compare runs/study/zero_adv/*-seed* --out runs/study/plots/zero_adv --title "dynamic sampling" > /dev/null
