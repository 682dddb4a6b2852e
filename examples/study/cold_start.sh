#!/usr/bin/env bash
# Cold start vs zero-RL (Mu et al. 2025; issue 18): the polarity modes (both, positive, negative, weighted) trained
# from the cold-start model (SmolLM2-135M-Instruct fine-tuned on long chains of thought, docs/SFT.md) and, with the
# same long responses, budget and eval sets, from the instruct model itself (zero-RL); then the tables of
# docs/REPRODUCTION.md. The cold-start model is made first when it is missing (about 30 minutes on 2 cores).
# usage: bash examples/study/cold_start.sh [SEED ...]        (default: 1 2 3)
#   SETTINGS="cold_start zero_rl_long" and MODES="both positive negative weighted inject" choose a subset; inject is
#   "both" with offline solutions injected into all-wrong groups (algo.injection; not in the default MODES).
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=configs/study/cpu_cold_start.yaml
EVAL_K=${EVAL_K:-2}
EVAL_PROBLEMS=${EVAL_PROBLEMS:-50}
source examples/study/common.sh
ensure_model
COLD=runs/cold_start/sft/hf
seeds=("$@")
if [ ${#seeds[@]} -eq 0 ]; then seeds=(1 2 3); fi
read -r -a settings <<< "${SETTINGS:-cold_start zero_rl_long}"
read -r -a modes <<< "${MODES:-both positive negative weighted}"
# the cold-start model only when a cold-start arm runs (the zero-RL arm starts from the instruct model alone)
if [[ " ${settings[*]} " == *" cold_start "* && ! -f "$COLD/config.json" ]]; then
    python examples/study/cold_start_data.py --out runs/cold_start/train.jsonl --n 300
    lcot-mega sft configs/cold_start_sft.yaml --run-dir runs/cold_start/sft
fi

# What distinguishes the settings: the starting model (first) and the reward (the rest, for training and eval). Cold
# start: the study's, </think> required and the last \boxed{} after it; zero-RL: the instruct model never writes
# the tag and often does not box, so the boxed answer or else the last number (as in configs/study/cpu_study.yaml).
setting_overrides() {
    case $1 in
        cold_start) echo "model.path=$COLD reward.require_think_close=true" ;;
        zero_rl_long) echo "model.path=$MODEL reward.require_think_close=false reward.fallbacks=[last_number]" ;;
        *) echo "unknown setting $1" >&2; return 2 ;;
    esac
}

# evaluate MODEL OUT OVERRIDE...: the eval sets of $CONFIG, EVAL_K samples and a greedy pass, resumable.
evaluate() {
    local model=$1 out=$2
    shift 2
    if [ ! -f "$out/summary.json" ]; then
        # shellcheck disable=SC2086  # EVAL_SEEDS is a list of seeds
        lcot-mega eval "$model" --config "$CONFIG" --out "$out" --k "$EVAL_K" --seeds $EVAL_SEEDS --greedy \
            --overwrite data.gym_eval_size="$EVAL_PROBLEMS" "$@"
    fi
}

# ROBUSTNESS=1: also the study's robustness probe on the in-domain set, into RUN/eval-robust (the starting model's
# into <its evaluation>-robust): `lcot-mega eval --robustness`, the problem behind an ignore block of a misleading
# instruction repeated PROBE_REPEATS times (the study's 100: ~900-token prompts, so a CPU pays mostly for prefill).
PROBE_DATA="reasoning_gym:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2"
PROBE_REPEATS=${PROBE_REPEATS:-100}
probe() {
    local model=$1 out=$2
    shift 2
    if [ -n "${ROBUSTNESS:-}" ] && [ ! -f "$out/summary.json" ]; then
        # shellcheck disable=SC2086  # EVAL_SEEDS is a list of seeds
        lcot-mega eval "$model" --config "$CONFIG" --out "$out" --data "$PROBE_DATA" --k "$EVAL_K" --seeds $EVAL_SEEDS \
            --robustness --probe-repeats "$PROBE_REPEATS" --overwrite data.gym_eval_size="$EVAL_PROBLEMS" "$@"
    fi
}

for setting in "${settings[@]}"; do
    read -r -a over <<< "$(setting_overrides "$setting")"
    base=runs/study/base-eval-long
    if [ "$setting" = cold_start ]; then base=runs/study/cold-start-eval; fi
    evaluate "${over[0]#model.path=}" "$base" "${over[@]:1}"
    probe "${over[0]#model.path=}" "$base-robust" "${over[@]:1}"
    for seed in "${seeds[@]}"; do
        for mode in "${modes[@]}"; do
            extra=(algo.polarity="$mode")
            if [ "$mode" = weighted ]; then extra+=(algo.positive_weight=0.1); fi
            if [ "$mode" = inject ]; then
                # both polarities, and the offline solutions injected into all-wrong groups: the run's own training
                # problems with a trace each, so it draws the prompt stream of "both" at this seed
                data=runs/study/injection-data/seed$seed/chain_sum.jsonl
                if [ ! -f "$data" ]; then
                    python examples/study/cold_start_data.py --for rl --run-config "$CONFIG" --run-seed "$seed" \
                        --out "$data"
                fi
                extra=(algo.polarity=both algo.injection.enabled=true "data.train=[$data]")
            fi
            run="runs/study/$setting/$mode-seed$seed"
            if [ ! -f "$run/done" ]; then
                train_run "$run" "${over[@]}" "${extra[@]}" trainer.seed="$seed"
            fi
            evaluate "$run" "$run/eval-final" "${over[@]:1}"
            probe "$run" "$run/eval-robust" "${over[@]:1}"
            lcot-mega plot "$run" > /dev/null
        done
    done
    python examples/study/tables.py "$setting" runs/study
    lcot-mega plot --compare runs/study/"$setting"/*-seed* --out runs/study/plots/"$setting" --title "$setting" > /dev/null
done
python examples/study/tables.py settings runs/study
python examples/study/figures.py settings runs/study  # docs/study/settings.png
