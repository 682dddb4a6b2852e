"""A real SGLang server (launched by `sglang_command` through `ServerSupervisor`) behind `SGLangHTTPEngine`: sampled
log-probs agree with teacher-forced `score()`, memory release/resume round trip, cache flush.

GPU only: skipped unless CUDA and the `sglang` package are present (`pip install lcot-mega[gpu]`). Never run on
the CPU development machines; written against SGLang 0.5's HTTP API as STACK-NOTES.md describes it."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers.tiny_models import make_tiny_hf, save_char_tokenizer

from lcot_mega.rollout.launcher import ServerSupervisor, sglang_command
from lcot_mega.rollout.protocol import SamplingParams
from lcot_mega.types import SampleStatus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None),
        reason="needs a CUDA GPU and the sglang package",
    ),
]

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [20, 21]]
# head_dim 64: SGLang's attention kernels do not take the 16 of the CPU tiny models. Moderately sharp weights, so
# log-probs spread (a shifted position would show) without bf16 rounding of large logits dominating.
GPU_TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    initializer_range=0.1,
)
BF16_TOL = 1e-2


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory):
    d = make_tiny_hf(tmp_path_factory.mktemp("sglang-tiny"), "llama", **GPU_TINY)
    save_char_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def client(gpu_model_dir, tmp_path_factory):
    def command(i: int, port: int) -> list[str]:
        extra = ["--dtype", "bfloat16", "--disable-cuda-graph", "--context-length", "1024"]
        return sglang_command(
            gpu_model_dir, port, mem_fraction_static=0.3, random_seed=0, enable_memory_saver=True, extra_args=extra
        )

    with ServerSupervisor(command, 1, tmp_path_factory.mktemp("sglang-logs"), health_deadline_s=600) as sup:
        yield sup.client(0, timeout_s=120)


def test_generate_returns_n_completions_per_prompt_with_token_logprobs(client):
    groups = client.generate(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True, n=2))
    assert len(groups) == len(PROMPTS) and all(len(g) == 2 for g in groups)
    for prompt, g in zip(PROMPTS, groups, strict=True):
        for c in g:
            assert c.finish is SampleStatus.TRUNCATED and len(c.token_ids) == len(c.logprobs) == 16
            assert c.prompt_tokens == len(prompt) and all(lp <= 0.0 for lp in c.logprobs)
            assert isinstance(c.weight_version, int)


def test_score_of_a_sampled_sequence_equals_its_sampled_logprobs_at_temperature_1(client):
    groups = client.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.0, ignore_eos=True))
    spread = []
    for prompt, (c,) in zip(PROMPTS, groups, strict=True):
        scored = client.score(prompt, c.token_ids)
        sampled = torch.tensor(c.logprobs)
        assert scored.shape == sampled.shape
        torch.testing.assert_close(scored, sampled, atol=BF16_TOL, rtol=0)
        spread.append(float(sampled.max() - sampled.min()))
    assert max(spread) > 0.1  # not a flat distribution, where any misalignment would pass


def test_release_and_resume_memory_then_reload_gives_the_same_logprobs(client, gpu_model_dir):
    probe, response = [3, 14, 15], [92, 65, 35, 89, 79]
    before = client.score(probe, response)
    client.release_memory()  # weights, KV cache and CUDA graphs; needs --enable-memory-saver and an idle server
    client.resume_memory()
    client.load_from_disk(str(gpu_model_dir), 2)  # released weights come back uninitialized: load them again
    assert client.weight_version == 2
    torch.testing.assert_close(client.score(probe, response), before, atol=BF16_TOL, rtol=0)
    (c,) = client.generate([probe], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert len(c.token_ids) == 4 and c.weight_version == 2


def test_flush_cache_keeps_the_server_serving(client):
    client.flush_cache()
    assert client.health()
    (c,) = client.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert len(c.token_ids) == 4


def test_sglang_returns_routed_experts_that_the_actor_format_reads(tmp_path_factory):
    """A tiny Qwen3-MoE served with `--enable-return-routed-experts`: every sample carries [prompt + response - 1,
    layers x top_k] expert ids in range, the first prompt tokens' routing equal to transformers' own top-k (routing
    the prompt does not depend on sampling; bf16 may flip near-ties, so most, not all, must agree)."""
    from transformers import AutoModelForCausalLM

    moe = dict(GPU_TINY, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True)
    model_dir = make_tiny_hf(tmp_path_factory.mktemp("sglang-moe"), "qwen3_moe", **moe)
    save_char_tokenizer(model_dir)

    def command(i: int, port: int) -> list[str]:
        extra = ["--dtype", "bfloat16", "--disable-cuda-graph", "--enable-return-routed-experts"]
        return sglang_command(model_dir, port, mem_fraction_static=0.3, random_seed=0, extra_args=extra)

    params = SamplingParams(max_new_tokens=16, n=2, seed=3, return_routed_experts=True)
    with ServerSupervisor(command, 1, tmp_path_factory.mktemp("sglang-moe-logs"), health_deadline_s=600) as sup:
        groups = sup.client(0, timeout_s=120).generate(PROMPTS, params)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    agree = total = 0
    for prompt, group in zip(PROMPTS, groups, strict=True):
        seen.clear()
        with torch.no_grad():
            model(torch.tensor([prompt]))
        own = torch.stack(seen, dim=1).sort(-1).values  # [prompt, layers, top_k]
        for c in group:
            routed = c.routed_experts
            assert routed.shape == (len(prompt) + len(c.token_ids) - 1, 4 * 2)
            assert int(routed.min()) >= 0 and int(routed.max()) < 8
            engine = routed[: len(prompt)].reshape(len(prompt), 4, 2).sort(-1).values
            agree += int((engine == own.to(engine.dtype)).all(-1).sum())
            total += len(prompt) * 4
    assert agree / total > 0.8
