#!/usr/bin/env bash
# Polarity ablation (Mu et al. 2025, positive vs negative samples): both, positive, negative and weighted
# (positives x 0.1) from the same start and budget, per seed; then the tables of docs/REPRODUCTION.md.
# usage: bash examples/study/polarity.sh [SEED ...]        (default: 1 2 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/study/common.sh
ensure_model
seeds=("$@")
if [ ${#seeds[@]} -eq 0 ]; then seeds=(1 2 3); fi
eval_base runs/study/base-eval
for seed in "${seeds[@]}"; do
    for mode in both positive negative weighted; do
        extra=()
        if [ "$mode" = weighted ]; then extra=(algo.positive_weight=0.1); fi
        train_and_eval "runs/study/polarity/$mode-seed$seed" algo.polarity="$mode" "${extra[@]}" trainer.seed="$seed"
    done
done
python examples/study/tables.py polarity runs/study
lcot-mega plot --compare runs/study/polarity/*-seed* --out runs/study/plots/polarity --title "polarity ablation" > /dev/null
