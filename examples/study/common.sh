# shellcheck shell=bash
# Shared by the study scripts (sourced, not run): one training run and its final evaluation, resumable.
# CONFIG, EVAL_K, EVAL_SEEDS and EVAL_PROBLEMS may be set by the caller's environment. EVAL_PROBLEMS takes the first
# N problems of each reasoning-gym eval set (the same N for every run, so comparisons are paired): 50 problems x 16
# samples cost about as much as 100 x 8, and pass@16 needs the 16.
CONFIG=${CONFIG:-configs/study/cpu_study.yaml}
EVAL_K=${EVAL_K:-16}
EVAL_SEEDS=${EVAL_SEEDS:-0}
EVAL_PROBLEMS=${EVAL_PROBLEMS:-50}
MODEL=runs/models/SmolLM2-135M-Instruct

ensure_model() {
    if [ ! -f "$MODEL/config.json" ]; then
        python tools/materialize_smollm2.py --out "$MODEL"
    fi
}

# train_run RUN_DIR OVERRIDE...: train (or resume an interrupted run) and mark the run done, but only when it ran to
# its last step. `lcot-mega train` stopped by SIGTERM/SIGINT checkpoints and exits 0 ("stopped by SIG..."; the same
# command resumes), so the calling script stops there too, instead of marking and evaluating a half-trained run.
train_run() {
    local run=$1 log status stopped=0
    shift
    log=$(mktemp)
    # no --resume: train resumes by itself from a committed checkpoint, and starts afresh (setting aside the
    # metrics of a run killed before its first checkpoint) when there is none
    lcot-mega train "$CONFIG" "$@" --run-dir "$run" | tee "$log"
    status=${PIPESTATUS[0]}
    grep -q "stopped by SIG" "$log" && stopped=1
    rm -f "$log"
    if [ "$status" -ne 0 ]; then
        exit "$status"
    fi
    if [ "$stopped" -eq 1 ]; then
        echo "study: $run was stopped before its last step; run the same command to resume it" >&2
        exit 0
    fi
    touch "$run/done"
}

# train_and_eval RUN_DIR OVERRIDE...: train (or resume an interrupted run), then evaluate the final checkpoint on
# the config's eval sets (in-domain and out-of-domain) with EVAL_K samples per seed. A finished step is skipped.
train_and_eval() {
    local run=$1
    shift
    if [ ! -f "$run/done" ]; then
        train_run "$run" "$@"
    fi
    if [ ! -f "$run/eval-final/summary.json" ]; then
        # shellcheck disable=SC2086  # EVAL_SEEDS is a list of seeds
        lcot-mega eval "$run" --config "$CONFIG" --out "$run/eval-final" --k "$EVAL_K" --seeds $EVAL_SEEDS \
            --greedy --overwrite data.gym_eval_size="$EVAL_PROBLEMS"
    fi
    lcot-mega plot "$run" > /dev/null
}

# eval_base OUT: the untrained model on the same eval sets, once.
eval_base() {
    local out=$1
    if [ ! -f "$out/summary.json" ]; then
        # shellcheck disable=SC2086
        lcot-mega eval "$MODEL" --config "$CONFIG" --out "$out" --k "$EVAL_K" --seeds $EVAL_SEEDS --greedy --overwrite \
            data.gym_eval_size="$EVAL_PROBLEMS"
    fi
}

# same_run_as LINK TARGET: an arm that is, key for key and seed for seed, a run another experiment already makes
# (e.g. relative length "off" = polarity "both") is linked to it instead of trained again; runs are deterministic
# on one machine (docs/LOG.md), so a second run would repeat the first.
same_run_as() {
    local link=$1 target=$2
    mkdir -p "$(dirname "$link")"
    if [ ! -e "$link" ]; then ln -s "$(realpath --relative-to="$(dirname "$link")" "$target")" "$link"; fi
}
