"""Write a tiny random model (4 layers, hidden 64, 96-token character tokenizer) for configs/tiny_cpu.yaml.

python tools/make_tiny_model.py --out runs/models/tiny-llama
"""

from __future__ import annotations

import argparse

from lcot_mega.utils.tiny_model import FAMILIES, MOE_FAMILIES, make_tiny_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/models/tiny-llama", help="HF directory to write")
    parser.add_argument("--family", default="llama", choices=(*FAMILIES, *MOE_FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {make_tiny_model_dir(args.out, args.family, args.seed)}")


if __name__ == "__main__":
    main()
