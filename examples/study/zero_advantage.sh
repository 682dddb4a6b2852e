#!/usr/bin/env bash
# Zero-advantage accounting (Mu et al. 2025, data efficiency): dynamic sampling off (train on every group) vs on
# (drop zero-advantage groups and refill, up to 4 rounds), per seed; then the tables.
# usage: bash examples/study/zero_advantage.sh [SEED ...]  (default: 1 2 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/study/common.sh
ensure_model
seeds=("$@")
if [ ${#seeds[@]} -eq 0 ]; then seeds=(1 2 3); fi
for seed in "${seeds[@]}"; do
    train_and_eval "runs/study/zero_adv/off-seed$seed" algo.dynamic_sampling.mode=off trainer.seed="$seed"
    train_and_eval "runs/study/zero_adv/refill-seed$seed" algo.dynamic_sampling.mode=drop \
        algo.dynamic_sampling.max_rounds=4 trainer.seed="$seed"
done
python examples/study/tables.py zero_adv runs/study
