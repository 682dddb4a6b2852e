#!/usr/bin/env bash
# Submit `lcot-mega train` to a running Ray cluster as a Ray job, after checking that the layout fits it.
#
#   RAY_ADDRESS=http://HEAD:8265 bash examples/multinode/ray_job_submit.sh CONFIG [dotted overrides...]
#
# RAY_ADDRESS is the head's dashboard (the job server; default http://127.0.0.1:8265). The fit check reads the
# cluster's nodes through RAY_GCS_ADDRESS (default HEAD:6379, the address `ray start --head` printed). The
# repository root is uploaded as the job's working directory; every node still needs lcot-mega's dependencies
# (torch, megatron-core, ...) in its image: the upload carries only the code. Environment: RUN_DIR (default
# runs/<config name>-<time>, relative to the job's working directory on the head node; use a shared or object-
# store path to keep the results), JOB_ID (default lcot-mega-<time>), NO_WAIT=1 (return after submitting).
# See README.md next to this script.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: RAY_ADDRESS=http://HEAD:8265 bash $0 CONFIG [dotted overrides...]" >&2
    exit 2
fi
CONFIG=$1
shift
cd "$(dirname "$0")/../.."

export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
HEAD_HOST=${RAY_ADDRESS#*://}
HEAD_HOST=${HEAD_HOST%%:*}
RAY_GCS_ADDRESS=${RAY_GCS_ADDRESS:-$HEAD_HOST:6379}
STAMP=$(date +%Y%m%d-%H%M%S)
NAME=$(basename "$CONFIG" .yaml)
RUN_DIR=${RUN_DIR:-runs/$NAME-$STAMP}
JOB_ID=${JOB_ID:-lcot-mega-$NAME-$STAMP}

# Ray 2.60 token authentication: the client sends the cluster's token only when RAY_AUTH_MODE=token. Turn that
# on when a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray looks for it);
# a cluster started without a token needs none. An explicit RAY_AUTH_MODE is left as it is.
if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] ||
    [ -f "$HOME/.ray/auth_token" ]; }; then
    export RAY_AUTH_MODE=token
fi

lcot-mega fit "$CONFIG" "$@" --ray-address "$RAY_GCS_ADDRESS"

# Overrides are quoted one by one so that the job's shell gets them back unchanged.
# `python -m` runs the uploaded code (the job's working directory is on its path), not an installed copy.
TRAIN=(python -m lcot_mega.cli train "$CONFIG" cluster.ray_address=auto "$@" --run-dir "$RUN_DIR")
printf -v ENTRYPOINT '%q ' "${TRAIN[@]}"
SUBMIT=(ray job submit --submission-id "$JOB_ID" --working-dir .
    --runtime-env-json '{"excludes": ["runs/", ".git/", "*.pt", "*.safetensors"]}')
if [ "${NO_WAIT:-0}" = 1 ]; then
    SUBMIT+=(--no-wait)
fi
echo "lcot-mega: submitting $JOB_ID to $RAY_ADDRESS (run dir $RUN_DIR on the cluster)"
"${SUBMIT[@]}" -- "$ENTRYPOINT"
