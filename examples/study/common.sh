# Shared by the study scripts (sourced, not run): one training run and its final evaluation, resumable.
# CONFIG, EVAL_K and EVAL_SEEDS may be set by the caller's environment.
CONFIG=${CONFIG:-configs/study/cpu_study.yaml}
EVAL_K=${EVAL_K:-16}
EVAL_SEEDS=${EVAL_SEEDS:-0}
MODEL=runs/models/SmolLM2-135M-Instruct

ensure_model() {
    if [ ! -f "$MODEL/config.json" ]; then
        python tools/materialize_smollm2.py --out "$MODEL"
    fi
}

# train_and_eval RUN_DIR OVERRIDE...: train (or resume an interrupted run), then evaluate the final checkpoint on
# the config's eval sets (in-domain and out-of-domain) with EVAL_K samples per seed. A finished step is skipped.
train_and_eval() {
    local run=$1
    shift
    if [ ! -f "$run/done" ]; then
        local resume=()
        if [ -d "$run/checkpoints" ]; then resume=(--resume); fi
        lcot-mega train "$CONFIG" "$@" --run-dir "$run" "${resume[@]}"
        touch "$run/done"
    fi
    if [ ! -f "$run/eval-final/summary.json" ]; then
        # shellcheck disable=SC2086  # EVAL_SEEDS is a list of seeds
        lcot-mega eval "$run" --config "$CONFIG" --out "$run/eval-final" --k "$EVAL_K" --seeds $EVAL_SEEDS \
            --greedy --overwrite
    fi
    lcot-mega plot "$run" > /dev/null
}

# eval_base OUT: the untrained model on the same eval sets, once.
eval_base() {
    local out=$1
    if [ ! -f "$out/summary.json" ]; then
        # shellcheck disable=SC2086
        lcot-mega eval "$MODEL" --config "$CONFIG" --out "$out" --k "$EVAL_K" --seeds $EVAL_SEEDS --greedy --overwrite
    fi
}
