"""Convert a Megatron dist checkpoint (any TP/PP) into a Hugging Face model directory.

    python tools/convert_mcore_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--hf-config DIR]

Same as `lcot-mega convert mcore-to-hf`; the work is in `lcot_mega.bridge.convert`.
"""

import sys

from lcot_mega.bridge.convert import main_mcore_to_hf

if __name__ == "__main__":  # dist-checkpointing's writer starts a spawned helper that imports this file again
    sys.exit(main_mcore_to_hf())
