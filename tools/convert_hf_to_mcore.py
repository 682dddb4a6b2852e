"""Convert a Hugging Face model directory into a Megatron dist checkpoint.

    python tools/convert_hf_to_mcore.py --hf HF_DIR --out CKPT_DIR [--tp N --pp N --ep N]

Same as `lcot-mega convert hf-to-mcore`; the work is in `lcot_mega.bridge.convert`.
"""

import sys

from lcot_mega.bridge.convert import main_hf_to_mcore

if __name__ == "__main__":  # the workers are spawned processes that import this file again
    sys.exit(main_hf_to_mcore())
