"""EmbeddedEngine against transformers itself: log-probs, greedy decoding, finish reasons, seeds, abort, weights."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers.tiny_models import FAMILIES, VOCAB, make_tiny_hf
from helpers.tiny_models import SHARP_LONG as MODEL

from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.protocol import Completion, RolloutEngine, SamplingParams, to_samples
from lcot_mega.rollout.sampling import process_logits
from lcot_mega.types import Group, Prompt, SampleStatus

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34]]  # lengths 3, 9, 1, 5
EOS = 2  # LlamaConfig's default eos_token_id; the tokenizer below agrees


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logits(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Logits [R, V] that predicted each response token: one unpadded forward over prompt + response."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0]
    return logits[len(prompt) - 1 : len(prompt) + len(response) - 1]


def hf_logprobs(model, prompt: list[int], c: Completion, **sampling) -> torch.Tensor:
    logp = process_logits(hf_logits(model, prompt, c.token_ids), **sampling)
    return logp.gather(-1, torch.tensor(c.token_ids).unsqueeze(-1)).squeeze(-1)


def first_index(ids: list[int], token: int) -> int:
    return ids.index(token) if token in ids else -1


# ---------------------------------------------------------------------------------------------- log-probs


def test_engine_logprobs_equal_a_transformers_forward_over_prompt_and_response(engine, hf_model):
    params = SamplingParams(max_new_tokens=24, n=3, temperature=0.7, seed=11)
    out = engine.generate(PROMPTS, params)
    assert [len(cs) for cs in out] == [3, 3, 3, 3]
    for prompt, comps in zip(PROMPTS, out, strict=True):
        assert len({tuple(c.token_ids) for c in comps}) == 3  # n independent samples
        for c in comps:
            assert c.prompt_tokens == len(prompt) and c.completion_tokens == len(c.token_ids) > 0
            reference = torch.log_softmax(hf_logits(hf_model, prompt, c.token_ids) / 0.7, dim=-1)
            expected = reference.gather(-1, torch.tensor(c.token_ids).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_transformers_for_every_family(tmp_path, family):
    from transformers import AutoModelForCausalLM

    d = make_tiny_hf(tmp_path, family, tie=family == "qwen3", **MODEL)
    out = EmbeddedEngine(d).generate(PROMPTS, SamplingParams(max_new_tokens=8, n=2, seed=0, ignore_eos=True))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for prompt, comps in zip(PROMPTS, out, strict=True):
        for c in comps:
            torch.testing.assert_close(torch.tensor(c.logprobs), hf_logprobs(model, prompt, c), atol=1e-4, rtol=0)


def test_left_padding_and_batch_composition_do_not_change_a_prompts_samples(engine):
    params = SamplingParams(max_new_tokens=16, n=2, seed=3, ignore_eos=True)
    batched = engine.generate(PROMPTS, params)
    # Alone, prompt 1 (the longest) has no padding; prompt i keeps its flat sample index by its position.
    for i in (1, 2):
        alone = engine.generate([PROMPTS[j] if j == i else [4] for j in range(i + 1)], params)[i]
        for a, b in zip(batched[i], alone, strict=True):
            # Draws are a function of (seed, sample index, step); padding moves logits by ~1e-7 only.
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampling", [{"top_k": 5}, {"top_p": 0.7}, {"min_p": 0.2}, {"top_k": 8, "top_p": 0.8}])
def test_truncated_sampling_reports_logprobs_of_the_renormalized_distribution(engine, hf_model, sampling):
    params = SamplingParams(max_new_tokens=12, n=3, temperature=0.9, seed=5, ignore_eos=True, **sampling)
    out = engine.generate(PROMPTS[:2], params)
    for prompt, comps in zip(PROMPTS[:2], out, strict=True):
        for c in comps:
            expected = hf_logprobs(hf_model, prompt, c, temperature=0.9, **sampling)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_top_k_logprobs_by_hand_and_tokens_inside_the_top_k(engine, hf_model):
    out = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=10, n=3, top_k=5, seed=2, ignore_eos=True))
    for prompt, comps in zip(PROMPTS[:2], out, strict=True):
        for c in comps:
            logits = hf_logits(hf_model, prompt, c.token_ids)  # [R, V]
            top_vals, top_ids = logits.topk(5, dim=-1)
            tok = torch.tensor(c.token_ids).unsqueeze(-1)
            assert (top_ids == tok).any(-1).all()
            expected = logits.gather(-1, tok).squeeze(-1) - top_vals.logsumexp(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_greedy_equals_argmax_decoding_of_the_hf_model(engine, hf_model):
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, n=2, temperature=0.0, ignore_eos=True))
    for prompt, comps in zip(PROMPTS, out, strict=True):
        ids = list(prompt)
        for _ in range(12):
            with torch.no_grad():
                ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
        for c in comps:
            assert c.token_ids == ids[len(prompt) :]
            assert c.logprobs == [0.0] * 12


# ----------------------------------------------------------------------------------------- finish reasons


def test_eos_completes_and_ignore_eos_runs_to_the_length_limit(engine):
    assert engine.eos_token_ids == (EOS,)
    base = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=200, n=8, seed=1, ignore_eos=True))[0]
    assert all(c.finish is SampleStatus.TRUNCATED and len(c.token_ids) == 200 for c in base)
    assert any(EOS in c.token_ids for c in base)  # with ignore_eos, EOS is sampled and generation goes on
    stopped = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=200, n=8, seed=1))[0]
    for full, c in zip(base, stopped, strict=True):
        cut = first_index(full.token_ids, EOS)
        if cut < 0:
            assert c.finish is SampleStatus.TRUNCATED and c.matched_stop is None and c.token_ids == full.token_ids
        else:  # same draws up to EOS, which is kept in token_ids and cut from the text
            assert c.finish is SampleStatus.COMPLETED and c.matched_stop == EOS
            assert c.token_ids == full.token_ids[: cut + 1] and len(c.logprobs) == cut + 1
            assert c.text == engine.tokenizer.decode(full.token_ids[:cut], skip_special_tokens=True)


def test_max_new_tokens_truncates(engine):
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=3, n=2, seed=0, ignore_eos=True))
    assert all(c.finish is SampleStatus.TRUNCATED and len(c.token_ids) == 3 for cs in out for c in cs)


def test_stop_token_id_completes_with_the_id_as_matched_stop(engine):
    base = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=40, seed=4, ignore_eos=True))[0][0]
    stop_id = base.token_ids[15]
    cut = base.token_ids.index(stop_id)
    params = SamplingParams(max_new_tokens=40, seed=4, ignore_eos=True, stop_token_ids=[stop_id])
    c = engine.generate([PROMPTS[1]], params)[0][0]
    assert c.finish is SampleStatus.COMPLETED and c.matched_stop == stop_id
    assert c.token_ids == base.token_ids[: cut + 1] and c.logprobs == base.logprobs[: cut + 1]
    assert c.text == engine.tokenizer.decode(base.token_ids[:cut], skip_special_tokens=True)


def test_stop_string_completes_and_is_cut_from_the_text(engine):
    tok = engine.tokenizer
    base = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=40, seed=9, ignore_eos=True))[0][0]
    assert base.text == tok.decode(base.token_ids, skip_special_tokens=True)
    stop = base.text[12:15]
    # The response ends with the token that completes the first occurrence of the stop string.
    m = next(m for m in range(1, 41) if stop in tok.decode(base.token_ids[:m], skip_special_tokens=True))
    params = SamplingParams(max_new_tokens=40, seed=9, ignore_eos=True, stop=["not-in-text-#", stop])
    c = engine.generate([PROMPTS[2]], params)[0][0]
    assert c.finish is SampleStatus.COMPLETED and c.matched_stop == stop
    assert c.token_ids == base.token_ids[:m]
    assert c.text == base.text[: base.text.index(stop)]


def test_stop_strings_without_a_tokenizer_are_refused_and_text_is_empty(other_dir):
    plain = EmbeddedEngine(other_dir)
    assert plain.tokenizer is None
    with pytest.raises(ValueError, match="tokenizer"):
        plain.generate([[3, 4]], SamplingParams(stop=["x"]))
    out = plain.generate([[3, 4]], SamplingParams(max_new_tokens=4, n=2))
    assert all(c.text == "" and len(c.token_ids) >= 1 for c in out[0])


# ----------------------------------------------------------------------------------------- seeds and chunks


def test_seed_reproduces_a_call_and_different_seeds_differ(engine):
    params = SamplingParams(max_new_tokens=10, n=3, seed=123, ignore_eos=True)
    a, b = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [[c.token_ids for c in cs] for cs in a] == [[c.token_ids for c in cs] for cs in b]
    other = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, n=3, seed=124, ignore_eos=True))
    assert [[c.token_ids for c in cs] for cs in a] != [[c.token_ids for c in cs] for cs in other]


def test_engine_seed_reproduces_unseeded_calls_across_engines(model_dir):
    params = SamplingParams(max_new_tokens=8, n=2, ignore_eos=True)
    first, second = EmbeddedEngine(model_dir, seed=7), EmbeddedEngine(model_dir, seed=7)
    a1, a2 = first.generate(PROMPTS, params), first.generate(PROMPTS, params)
    b1 = second.generate(PROMPTS, params)
    ids = lambda out: [[c.token_ids for c in cs] for cs in out]  # noqa: E731
    assert ids(a1) == ids(b1) and ids(a1) != ids(a2)  # the engine's RNG moves on between calls


def test_small_max_batch_tokens_splits_into_chunks_with_the_same_samples(model_dir, engine):
    params = SamplingParams(max_new_tokens=10, n=2, seed=8, ignore_eos=True)
    chunked = EmbeddedEngine(model_dir, max_batch_tokens=40)  # 9 + 2 x 10 KV tokens fit; a second prompt does not
    assert len(list(chunked._chunks(PROMPTS, params))) == 4
    ref, out = engine.generate(PROMPTS, params), chunked.generate(PROMPTS, params)
    for r_cs, o_cs in zip(ref, out, strict=True):
        for r, o in zip(r_cs, o_cs, strict=True):
            assert r.token_ids == o.token_ids
            torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(o.logprobs), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- abort


def test_abort_from_another_thread_returns_partial_aborted_samples(model_dir):
    eng = EmbeddedEngine(model_dir, max_batch_tokens=2 * 3 * (9 + 3000))  # two chunks: the second never starts
    params = SamplingParams(max_new_tokens=3000, n=3, ignore_eos=True)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(eng.generate(PROMPTS, params)))
    worker.start()
    deadline = time.monotonic() + 30
    while eng.tokens_generated < 30 and time.monotonic() < deadline:  # 5+ decode steps of 6 rows
        time.sleep(0.005)
    assert eng.in_flight
    t0 = time.monotonic()
    eng.abort()
    worker.join(timeout=30)
    assert not worker.is_alive() and time.monotonic() - t0 < 5
    comps = [c for cs in result[0] for c in cs]
    assert all(c.finish is SampleStatus.ABORTED for c in comps)
    lengths = [len(c.token_ids) for c in comps]
    assert any(0 < n < 3000 for n in lengths) and lengths.count(0) == 6  # one chunk of 2 prompts untouched
    assert all(len(c.logprobs) == len(c.token_ids) for c in comps)
    # The flag does not leak into the next call, and an abort with nothing in flight is a no-op.
    eng.abort()
    again = eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert again[0][0].finish is SampleStatus.TRUNCATED and len(again[0][0].token_ids) == 4


# ------------------------------------------------------------------------------------------------ weights


def test_update_weights_loads_another_models_weights_and_bumps_the_version(model_dir, other_dir):
    from transformers import AutoModelForCausalLM

    eng = EmbeddedEngine(model_dir)
    other = AutoModelForCausalLM.from_pretrained(other_dir, dtype=torch.float32).eval()
    assert eng.weight_version == 0
    eng.update_weights(((k, v.clone()) for k, v in other.state_dict().items()), version=1)  # a generator works
    assert eng.weight_version == 1
    out = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=10, n=3, seed=0, ignore_eos=True))
    for prompt, comps in zip(PROMPTS[:2], out, strict=True):
        for c in comps:
            assert c.weight_version == 1
            torch.testing.assert_close(torch.tensor(c.logprobs), hf_logprobs(other, prompt, c), atol=1e-4, rtol=0)


def test_update_weights_rejects_unknown_names_and_wrong_shapes(model_dir):
    eng = EmbeddedEngine(model_dir)
    with pytest.raises(ValueError, match="unknown parameter"):
        eng.update_weights([("model.layers.0.mlp.not_a_weight", torch.zeros(3))], version=1)
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights([("model.norm.weight", torch.zeros(65))], version=1)
    assert eng.weight_version == 0


def test_update_weights_casts_to_the_engine_dtype(model_dir, other_dir):
    from transformers import AutoModelForCausalLM

    eng = EmbeddedEngine(model_dir, dtype=torch.bfloat16)
    other = AutoModelForCausalLM.from_pretrained(other_dir, dtype=torch.float32)
    eng.update_weights(other.state_dict().items(), version=3)
    w = eng._model.get_input_embeddings().weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, other.get_input_embeddings().weight.bfloat16())


def test_bfloat16_engine_logprobs_are_close_to_fp32(model_dir, hf_model):
    eng = EmbeddedEngine(model_dir, dtype=torch.bfloat16)
    out = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=10, n=2, seed=0, ignore_eos=True))
    diffs = [
        (torch.tensor(c.logprobs) - hf_logprobs(hf_model, prompt, c)).abs()
        for prompt, comps in zip(PROMPTS[:2], out, strict=True)
        for c in comps
    ]
    diffs = torch.cat(diffs)  # bf16 logits carry ~3 significant digits: close on average, not per token
    assert diffs.mean() < 0.05 and diffs.max() < 0.5


@pytest.mark.parametrize("tie", [False, True])
def test_release_frees_weights_and_generation_waits_for_a_full_reload(tmp_path, tie):
    d = make_tiny_hf(tmp_path, "llama", tie=tie, **MODEL)
    eng = EmbeddedEngine(d)
    params = SamplingParams(max_new_tokens=8, n=2, seed=0, ignore_eos=True)
    before = eng.generate(PROMPTS, params)
    state = {k: v.clone() for k, v in eng._model.state_dict().items()}
    eng.release_memory()
    assert all(p.is_meta for p in eng._model.parameters())
    eng.resume_memory(["kv_cache"])  # weights stay released
    with pytest.raises(RuntimeError, match="released"):
        eng.generate(PROMPTS, params)
    eng.resume_memory()
    assert not any(p.is_meta for p in eng._model.parameters())
    if tie:
        assert eng._model.lm_head.weight is eng._model.get_input_embeddings().weight
    names = [k for k in state if k != "lm_head.weight" or not tie]  # a tied model needs one of the two names
    eng.update_weights([(k, state[k]) for k in names[:-1]], version=1)
    with pytest.raises(RuntimeError, match="1 tensors missing"):
        eng.generate(PROMPTS, params)
    eng.update_weights([(names[-1], state[names[-1]])], version=2)
    after = eng.generate(PROMPTS, params)
    assert [[c.token_ids for c in cs] for cs in after] == [[c.token_ids for c in cs] for cs in before]
    eng.release_memory(["weights"])
    eng.resume_memory(["weights"])
    eng.reload_weights()
    assert eng.weight_version == 0
    again = eng.generate(PROMPTS, params)
    assert [[c.token_ids for c in cs] for cs in again] == [[c.token_ids for c in cs] for cs in before]


def test_memory_tags_are_validated(engine):
    with pytest.raises(ValueError, match="memory tag"):
        engine.release_memory(["gpu"])


# ------------------------------------------------------------------------------------ contract and lifecycle


def test_engine_satisfies_the_protocol_and_converts_to_samples(engine):
    assert isinstance(engine, RolloutEngine)
    engine.flush_cache()
    assert engine.health()
    prompt = Prompt(uid="p0", text="", answer="1", token_ids=tuple(PROMPTS[0]))
    comps = engine.generate([prompt.token_ids], SamplingParams(max_new_tokens=6, n=3, seed=0))[0]
    group = Group(prompt, to_samples(prompt, comps))
    assert len(group) == 3
    for s, c in zip(group.samples, comps, strict=True):
        assert s.response_ids == c.token_ids and s.rollout_logprobs == c.logprobs and s.status is c.finish
        assert s.response_text == c.text and s.weight_version == c.weight_version


def test_bad_prompts_raise(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, VOCAB]], SamplingParams())


def test_shutdown_makes_the_engine_unhealthy(model_dir):
    eng = EmbeddedEngine(model_dir)
    eng.shutdown()
    assert not eng.health()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_the_kv_cache_keyword_follows_the_installed_transformers():
    """transformers renamed forward's `past_key_values` to `cache`; both swallow unknown keywords, so the engine
    must pick the name the model declares (a silently dropped cache decodes garbage)."""
    from lcot_mega.rollout.embedded import _cache_keyword

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs): ...

    assert _cache_keyword(Old()) == "past_key_values" and _cache_keyword(New()) == "cache"


SHIM_PROBE = """
import sys, torch
from torch.overrides import TorchFunctionMode
from lcot_mega.actor import cpu_compat
from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.protocol import SamplingParams

class Counting(TorchFunctionMode):
    calls = 0
    def __torch_function__(self, func, types, args=(), kwargs=None):
        Counting.calls += 1
        return func(*args, **(kwargs or {}))

engine = EmbeddedEngine(sys.argv[1])
params = SamplingParams(max_new_tokens=12, n=2, seed=3, ignore_eos=True)
prompts = [[5, 6, 7], [8, 9]]
before = [[c.token_ids for c in g] for g in engine.generate(prompts, params)]
assert cpu_compat.enable()
with Counting():
    after = [[c.token_ids for c in g] for g in engine.generate(prompts, params)]
    in_generate = Counting.calls
    torch.ones(2) + 1
print(before == after, in_generate, Counting.calls > in_generate)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the megatron-core CPU shim is a no-op where CUDA exists")
def test_generate_runs_outside_the_megatron_cpu_shim_and_samples_the_same(model_dir):
    """A process with a Megatron actor has `cpu_compat`'s function mode on for good; decoding under it paid a Python
    call per torch op. Generate runs outside every function mode there, with the same samples as before the shim."""
    import subprocess
    import sys

    pytest.importorskip("megatron.core")
    run = subprocess.run([sys.executable, "-c", SHIM_PROBE, str(model_dir)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "0", "True"]
