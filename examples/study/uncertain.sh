#!/usr/bin/env bash
# Uncertain problems (Mu et al. 2025, instability): the polarity runs' final checkpoints evaluated with many
# samples and several sampling seeds, plus greedy; how many problems are uncertain, how often greedy and sampled
# answers disagree, how many runs a stable comparison on 30 problems needs. Run polarity.sh first.
# usage: bash examples/study/uncertain.sh [SEED ...]        (the polarity seeds to evaluate; default: 1)
# MODES (default "both negative") names the polarity modes whose checkpoints are evaluated.
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/study/common.sh
seeds=("$@")
if [ ${#seeds[@]} -eq 0 ]; then seeds=(1); fi
for seed in "${seeds[@]}"; do
    for mode in ${MODES:-both negative}; do
        run="runs/study/polarity/$mode-seed$seed"
        if [ ! -f "$run/eval-uncertain/summary.json" ]; then
            lcot-mega eval "$run" --config "$CONFIG" --out "$run/eval-uncertain" --k 16 --seeds 0 1 2 --greedy \
                --overwrite data.gym_eval_size="$EVAL_PROBLEMS"
        fi
    done
done
python examples/study/tables.py uncertain runs/study
