"""The embedded engine's shared prompt KV cache against the repeated one (the reference path): same samples, one
prompt copy per layer, the bytes it saves, the chunk budget, the fallback for models it does not serve."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.tiny_models import FAMILIES, make_tiny_hf, save_char_tokenizer
from helpers.tiny_models import SHARP_LONG as MODEL

from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.protocol import Completion, SamplingParams
from lcot_mega.rollout.shared_kv import SharedPrefixCache, shared_prefix_attention, supported_reason
from lcot_mega.types import SampleStatus

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34]]  # lengths 3, 9, 1, 5
LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 16  # the tiny models' shape (TINY_SHAPE)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, tuple[EmbeddedEngine, EmbeddedEngine]]:
    """Per family: (shared, repeated) engines on one tiny model with the character tokenizer."""
    out = {}
    for family in FAMILIES:
        d = make_tiny_hf(tmp_path_factory.mktemp(family), family, tie=family == "qwen3", **MODEL)
        save_char_tokenizer(d)
        shared, repeated = EmbeddedEngine(d, share_prompt_kv=True), EmbeddedEngine(d, share_prompt_kv=False)
        assert shared.share_prompt_kv and not repeated.share_prompt_kv
        out[family] = (shared, repeated)
    return out


def assert_same_samples(shared: list[list[Completion]], repeated: list[list[Completion]]) -> None:
    for s_cs, r_cs in zip(shared, repeated, strict=True):
        for s, r in zip(s_cs, r_cs, strict=True):
            assert (s.token_ids, s.finish, s.matched_stop, s.text) == (r.token_ids, r.finish, r.matched_stop, r.text)
            # fp32 noise of another summation order: on these sharp models (log-probs down to -10) either path is
            # 0.5-1.5e-5 from an fp64 forward, and the two differ by up to 1.2e-5 (see the fp64 test below)
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(r.logprobs), atol=2e-5, rtol=0)


CASES = {
    "sampled-n4": {"n": 4, "seed": 3},
    "sampled-n1": {"n": 1, "seed": 5, "ignore_eos": True},
    "greedy-n4": {"n": 4, "temperature": 0.0, "ignore_eos": True},
    "top-p-n4": {"n": 4, "seed": 7, "temperature": 0.8, "top_p": 0.9},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_kv_gives_the_repeated_caches_samples(engines, family, case):
    shared, repeated = engines[family]
    params = SamplingParams(max_new_tokens=32, **CASES[case])
    assert_same_samples(shared.generate(PROMPTS, params), repeated.generate(PROMPTS, params))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rows_ending_at_different_steps_on_stop_ids_and_strings_match_the_repeated_cache(engines, family):
    shared, repeated = engines[family]
    base = SamplingParams(max_new_tokens=32, n=4, seed=1, ignore_eos=True)
    free = [c for cs in repeated.generate(PROMPTS, base) for c in cs]
    # Stop on tokens and on pieces of text that rows draw at steps 3 to 27: rows end all over.
    stop_ids = [free[r].token_ids[4 + 5 * (r % 5)] for r in range(0, 16, 3)]
    stop_texts = [free[r].text[3 + 6 * i : 5 + 6 * i] for i, r in enumerate((0, 5, 10, 15))]
    for params in (
        SamplingParams(max_new_tokens=32, n=4, seed=1, ignore_eos=True, stop_token_ids=stop_ids),
        SamplingParams(max_new_tokens=32, n=4, seed=1, ignore_eos=True, stop=stop_texts),
        SamplingParams(max_new_tokens=32, n=4, seed=1, stop_token_ids=stop_ids[:2], stop=stop_texts[:2]),
    ):
        out = shared.generate(PROMPTS, params)
        lengths = [len(c.token_ids) for cs in out for c in cs]
        assert len(set(lengths)) >= 4 and any(c.finish is SampleStatus.COMPLETED for cs in out for c in cs)
        assert_same_samples(out, repeated.generate(PROMPTS, params))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_shared_prompt_kv_is_as_close_to_an_fp64_forward_as_the_repeated_cache(engines, family):
    import copy

    from lcot_mega.rollout.sampling import process_logits

    shared, repeated = engines[family]
    fp64 = copy.deepcopy(repeated._model).double()
    params = SamplingParams(max_new_tokens=32, n=4, seed=7, temperature=0.8, top_p=0.9)
    errors = []
    for engine in (shared, repeated):
        err = 0.0
        for prompt, comps in zip(PROMPTS, engine.generate(PROMPTS, params), strict=True):
            for c in comps:
                with torch.no_grad():
                    logits = fp64(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]
                logp = process_logits(logits, temperature=0.8, top_p=0.9)
                expected = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
                err = max(err, (torch.tensor(c.logprobs, dtype=torch.float64) - expected).abs().max().item())
        errors.append(err)
    assert errors[0] < 3e-5 and errors[0] < 1.5 * errors[1], errors


def _attention_case(dtype: torch.dtype):
    """A SharedPrefixCache of 3 left-padded prompts x 4 rows (rows 0-3 and 5 finished), one layer, and queries."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    prompts, n, kv, group, dim, p, t = 3, 4, 2, 3, 32, 7, 5
    randn = lambda *shape: (2 * torch.randn(*shape, generator=g)).to(dtype)  # noqa: E731
    prefill = DynamicCache()
    prefill.update(randn(prompts, kv, p, dim), randn(prompts, kv, p, dim), 0)
    mask = torch.ones(prompts, p, dtype=torch.long)
    mask[0, :4], mask[1, :2] = 0, 0
    cache = SharedPrefixCache(prefill, mask, n)
    cache.layers[0].update(randn(prompts * n, kv, t, dim), randn(prompts * n, kv, t, dim))
    cache.batch_select_indices(torch.tensor([4, 6, 7, 8, 9, 10, 11]))  # prompt 0 leaves; prompt 1 keeps 3 rows
    query = randn(7, kv * group, 1, dim)
    return cache, query, mask[1:], group


def _reference_attention(cache, query, mask, group) -> torch.Tensor:
    """fp64 softmax over each row's valid prompt keys + its own keys, one row and head at a time: [A, 1, H, d]."""
    layer, out = cache.layers[0], torch.zeros(query.shape, dtype=torch.float64)
    for a, i in enumerate(cache.row_prompt.tolist()):
        for h in range(query.shape[1]):
            keep = mask[i].bool()
            k = torch.cat([layer.prefix_keys[i, h // group][keep], layer.keys[a, h // group]]).double()
            v = torch.cat([layer.prefix_values[i, h // group][keep], layer.values[a, h // group]]).double()
            w = (query[a, h, 0].double() @ k.T / k.shape[-1] ** 0.5).softmax(-1)
            out[a, h, 0] = w @ v
    return out.transpose(1, 2)


def test_the_attention_equals_one_softmax_over_prompt_and_own_keys():
    cache, query, mask, group = _attention_case(torch.float32)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=group, is_causal=True, training=False)
    layer = cache.layers[0]
    out, _ = shared_prefix_attention(module, query, layer.keys, layer.values, None, shared_kv=cache)
    assert cache.width == 4 and out.shape == (7, 1, 6, 32)  # prompt 1 leaves one grid slot empty
    # scores up to ~20 here: fp32 SDPA over the repeated keys is 4.9e-6 from this fp64 reference, this 4.7e-6
    torch.testing.assert_close(out.double(), _reference_attention(cache, query, mask, group), atol=1e-5, rtol=0)


def test_bfloat16_attention_is_as_close_to_fp64_as_sdpa_over_the_repeated_keys():
    """SDPA accumulates bf16 in fp32 (here 1.7e-3 mean error; the two blocks' bf16 outputs 2.2e-3); scores from plain
    bf16 matmuls were 3.7x farther from fp64 (6.4e-3)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache, query, mask, group = _attention_case(torch.bfloat16)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=group, is_causal=True, training=False)
    layer = cache.layers[0]
    shared, _ = shared_prefix_attention(module, query, layer.keys, layer.values, None, shared_kv=cache)
    rows = cache.row_prompt
    keys = torch.cat([layer.prefix_keys[rows], layer.keys], 2)
    values = torch.cat([layer.prefix_values[rows], layer.values], 2)
    full_mask = torch.cat([mask[rows], torch.ones(len(rows), layer.keys.shape[2], dtype=torch.long)], 1)
    repeated, _ = sdpa_attention_forward(module, query, keys, values, full_mask.bool()[:, None, None])
    expected = _reference_attention(cache, query, mask, group)
    errors = [(x.double() - expected).abs().mean().item() for x in (shared, repeated)]
    assert errors[0] < 1.6 * errors[1], errors


# ------------------------------------------------------------------------------------------ what is stored


def _decode_cache(engine: EmbeddedEngine, n: int, steps: int):
    """Prefill PROMPTS and run `steps` greedy decode steps; the cache and the rows."""
    with torch.inference_mode():
        logits, rows, cache = engine._prefill(PROMPTS, n)
        for _ in range(steps):
            logits = engine._decode_step(logits.argmax(-1), rows, cache)
    return cache, rows


def test_the_decode_cache_holds_one_prompt_copy_per_layer_and_drops_finished_prompts(engines):
    shared, _ = engines["llama"]
    cache, rows = _decode_cache(shared, n=3, steps=2)
    assert isinstance(cache, SharedPrefixCache) and len(cache.layers) == LAYERS
    for layer in cache.layers:
        assert layer.prefix_keys.shape == layer.prefix_values.shape == (4, KV_HEADS, 9, HEAD_DIM)  # P, kv, p, d
        assert layer.keys.shape == layer.values.shape == (12, KV_HEADS, 2, HEAD_DIM)  # P * n rows, kv, t, d
    # Prompt 0's three rows and one row of prompt 1 finish: prompt 0 leaves the prefix store.
    keep = torch.ones(12, dtype=torch.bool)
    keep[[0, 1, 2, 4]] = False
    cache.batch_select_indices(keep.nonzero().flatten())
    rows.keep(keep)
    assert cache.num_prompts == 3 and cache.width == 3
    assert cache.row_prompt.tolist() == [0, 0, 1, 1, 1, 2, 2, 2] and cache.slot.tolist() == [0, 1, 3, 4, 5, 6, 7, 8]
    for layer in cache.layers:
        assert layer.prefix_keys.shape == (3, KV_HEADS, 9, HEAD_DIM) and layer.keys.shape[0] == 8
    with torch.inference_mode():  # decoding goes on over the smaller store
        assert shared._decode_step(torch.ones(8, dtype=torch.long), rows, cache).shape == (8, 96)


def _storage_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor storage reachable from `obj` through attributes, lists, tuples and dicts:
    whatever the cache keeps, however it names it, is counted once at its real (not viewed) size."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.device, torch.dtype)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    return sum(_storage_bytes(c, seen) for c in children)


def test_cache_bytes_are_one_prompt_copy_plus_the_responses_by_hand(engines):
    shared, repeated = engines["llama"]
    n, steps, prompts, longest = 4, 3, len(PROMPTS), 9
    per_token = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # K and V, fp32, all layers
    rows = prompts * n
    shared_cache, _ = _decode_cache(shared, n, steps)
    repeated_cache, _ = _decode_cache(repeated, n, steps)
    bookkeeping = prompts * longest * 4 + 2 * rows * 8  # padding bias (fp32), row -> prompt and grid slot (int64)
    assert _storage_bytes(shared_cache) == (prompts * longest + rows * steps) * per_token + bookkeeping
    assert _storage_bytes(repeated_cache) == rows * (longest + steps) * per_token
    # 36 + 48 tokens against 16 x 12 = 192: n - 1 prompt copies saved
    assert _storage_bytes(repeated_cache) / _storage_bytes(shared_cache) > 2.2


# ---------------------------------------------------------------------------------------------- chunking


def test_chunks_budget_the_kv_tokens_stored_so_more_prompts_fit(engines):
    shared, _ = engines["llama"]
    params = SamplingParams(max_new_tokens=10, n=2, seed=8, ignore_eos=True)
    budget = 2 * 9 + 2 * 2 * 10  # two prompts (longest 9) once + four responses
    small = EmbeddedEngine(shared.model_dir, max_batch_tokens=budget, share_prompt_kv=True)
    assert list(small._chunks(PROMPTS, params)) == [[1, 3], [0, 2]]  # longest first; a third prompt does not fit
    # Repeated, prompts 1 and 3 store 2 x 2 x (9 + 10) = 76 tokens, 3 and 0 still 60; only 0 and 2 share a chunk.
    repeated = EmbeddedEngine(shared.model_dir, max_batch_tokens=budget, share_prompt_kv=False)
    assert list(repeated._chunks(PROMPTS, params)) == [[1], [3], [0, 2]]
    assert_same_samples(small.generate(PROMPTS, params), shared.generate(PROMPTS, params))


# ---------------------------------------------------------------------------------------------- fallback


def test_models_the_shared_attention_does_not_serve_keep_the_repeated_cache(tmp_path):
    from transformers import AutoModelForCausalLM

    d = make_tiny_hf(tmp_path / "sliding", "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    engine = EmbeddedEngine(d, share_prompt_kv=True)
    assert not engine.share_prompt_kv and engine._model.config._attn_implementation == "sdpa"
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2, seed=0, ignore_eos=True))
    assert [len(c.token_ids) for cs in out for c in cs] == [6] * 8
    llama = make_tiny_hf(tmp_path / "llama", "llama")
    assert "eager" in supported_reason(AutoModelForCausalLM.from_pretrained(llama, attn_implementation="eager"))
    assert "device meta" in supported_reason(AutoModelForCausalLM.from_pretrained(llama).to("meta"))
