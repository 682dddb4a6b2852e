#!/usr/bin/env bash
# CPU quick start. Until the RL loop lands this validates the quick-start recipe and self-tests the
# installed components (config, isolated grading, RL math); then it will train SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
lcot-mega check configs/quickstart.yaml --run-dir runs/quickstart "$@"
