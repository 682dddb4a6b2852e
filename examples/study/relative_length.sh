#!/usr/bin/env bash
# Relative length reward (Mu et al. 2025, from DeepScaleR): off vs on from the same start, per seed. The study's
# length_base of 500 tokens is scaled to this task's responses (about 10-30 tokens, not thousands): 8.
# usage: bash examples/study/relative_length.sh [SEED ...]  (default: 1 2 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/study/common.sh
ensure_model
seeds=("$@")
if [ ${#seeds[@]} -eq 0 ]; then seeds=(1 2 3); fi
for seed in "${seeds[@]}"; do
    # "off" is the polarity ablation's "both" run of the same seed (the same config and overrides)
    train_and_eval "runs/study/polarity/both-seed$seed" algo.polarity=both trainer.seed="$seed"
    same_run_as "runs/study/length/off-seed$seed" "runs/study/polarity/both-seed$seed"
    train_and_eval "runs/study/length/on-seed$seed" reward.relative_length.enabled=true \
        reward.relative_length.length_base=8 trainer.seed="$seed"
done
python examples/study/tables.py length runs/study
lcot-mega plot --compare runs/study/length/*-seed* --out runs/study/plots/length --title "relative length reward" > /dev/null
