"""SDPA core attention (actor.attention = sdpa) equals megatron-core's DotProductAttention and transformers, and
keeps no [heads, s, s] tensor (issue 17)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tensor_helpers import one_thread
from helpers.tiny_models import SHARP_LONG, make_tiny_hf

pytest.importorskip("megatron.core")

# (name, heads, query groups, extra TransformerConfig / module settings)
MODULE_CASES = [
    ("gqa", 8, 2, {}),
    ("mha", 4, 4, {}),
    ("gqa_scale", 6, 3, {"softmax_scale": 0.3}),
    ("mha_qk_layer_scaling", 4, 4, {"apply_query_key_layer_scaling": True}),
    ("gqa_padding_mask", 4, 2, {"padding_mask": True}),
]
SEQ, BATCH, HEAD_DIM = 37, 2, 16


def _tiny_config(heads: int, groups: int, **kwargs):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=4,
        hidden_size=heads * HEAD_DIM,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=HEAD_DIM,
        use_cpu_initialization=True,
        masked_softmax_fusion=False,
        **kwargs,
    )


def _qkv_and_mask(heads: int, groups: int, padding_mask: bool, seed: int = 0):
    """q [s, b, np, hn], k/v [s, b, ng, hn], an upstream gradient, and a bool mask (True = masked, megatron's
    convention) hiding the first 5 keys of the second sequence from every query after them (no query loses all)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(SEQ, BATCH, heads, HEAD_DIM, generator=g)
    k, v = (torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=g) for _ in range(2))
    grad = torch.randn(SEQ, BATCH, heads * HEAD_DIM, generator=g)
    if not padding_mask:
        return q, k, v, grad, None
    mask = torch.ones(SEQ, SEQ).triu(1).bool().expand(BATCH, 1, SEQ, SEQ).clone()  # [b, 1, sq, sk]
    mask[1, :, 5:, :5] = True
    return q, k, v, grad, mask


def _run_module(module_cls, case, training: bool = False):
    """Output and input gradients of one core-attention module on `case`'s random inputs."""
    from megatron.core.transformer.enums import AttnMaskType

    _, heads, groups, extra = case
    extra = dict(extra)
    padding = extra.pop("padding_mask", False)
    scale = extra.pop("softmax_scale", None)
    config = _tiny_config(heads, groups, **extra)
    mask_type = AttnMaskType.padding if padding else AttnMaskType.causal
    module = module_cls(config, 3, mask_type, "self", softmax_scale=scale).train(training)
    q, k, v, grad, mask = _qkv_and_mask(heads, groups, padding)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask, attn_mask_type=mask_type)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _module_vs_megatron(rank: int, world: int, cases) -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.sdpa_attention import SDPAttention
    from lcot_mega.config import ActorConfig

    torch.set_num_threads(1)
    ma.init_parallel(ActorConfig(), seed=1)
    out = {case[0]: (_run_module(SDPAttention, case), _run_module(DotProductAttention, case)) for case in cases}
    dropout_case = ("dropout", 4, 2, {"attention_dropout": 0.5})
    out["dropout"] = (_run_module(SDPAttention, dropout_case, training=True), _run_module(SDPAttention, dropout_case))
    return out


def test_output_and_input_gradients_equal_dot_product_attention():
    results = run_gloo(_module_vs_megatron, 1, MODULE_CASES)[0]
    for name, _, _, _ in MODULE_CASES:
        ours, megatron = results[name]
        for what, got, want in zip(("out", "dq", "dk", "dv"), ours, megatron, strict=True):
            assert got.shape == want.shape, (name, what)
            assert torch.allclose(got, want, rtol=0, atol=1e-5), (name, what, (got - want).abs().max())
    # attention dropout is applied in training: p = 0.5 changes the output of the same inputs
    (dropped, *_), (clean, *_) = results["dropout"]
    assert dropped.shape == clean.shape and not torch.allclose(dropped, clean, atol=1e-2)


def _stub_pg(tp_size: int = 1):
    return SimpleNamespace(tp=SimpleNamespace(size=lambda: tp_size))


def _packed_vs_separate(rank: int, world: int) -> tuple[list, list]:
    """SDPAttention on packed THD input, and DotProductAttention on each sequence alone: outputs, input grads."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.sdpa_attention import SDPAttention
    from lcot_mega.config import ActorConfig

    torch.set_num_threads(1)
    ma.init_parallel(ActorConfig(), seed=1)
    lengths, heads, groups = [5, 1, 12, 7], 4, 2
    config = _tiny_config(heads, groups)
    packed_module = SDPAttention(config, 2, AttnMaskType.causal, "self").eval()
    reference = DotProductAttention(config, 2, AttnMaskType.causal, "self").eval()
    g = torch.Generator().manual_seed(5)
    t = sum(lengths)
    q = torch.randn(t, heads, HEAD_DIM, generator=g, requires_grad=True)
    k, v = (torch.randn(t, groups, HEAD_DIM, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(t, heads, HEAD_DIM, generator=g)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12)
    out = packed_module(q, k, v, None, packed_seq_params=params)  # [t, np, hn]
    out.backward(grad)
    got = [out.detach(), q.grad, k.grad, v.grad]
    want_out, leaves = [], [x.detach().clone().requires_grad_() for x in (q, k, v)]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        piece = [x[start:end].unsqueeze(1) for x in leaves]  # [L, 1, heads, hn]
        o = reference(*piece, None, attn_mask_type=AttnMaskType.causal)  # [L, 1, np * hn]
        o.backward(grad[start:end].reshape(end - start, 1, -1))
        want_out.append(o.detach().reshape(end - start, heads, HEAD_DIM))
    return got, [torch.cat(want_out), *(x.grad for x in leaves)]


def test_packed_sequences_attend_each_within_itself_like_separate_calls():
    """THD input (sequences end to end, as megatron's Attention hands it with packed_seq_params): output and input
    gradients equal DotProductAttention run on each sequence alone."""
    got, want = run_gloo(_packed_vs_separate, 1)[0]
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (what, (a - b).abs().max())


def test_unsupported_packed_layouts_and_settings_are_refused():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from lcot_mega.actor.sdpa_attention import SDPAttention, SDPAttentionUnsupported

    module = SDPAttention(_tiny_config(4, 2), 1, AttnMaskType.causal, "self", pg_collection=_stub_pg())
    q, k, v, _, _ = _qkv_and_mask(4, 2, False)
    cu, other = torch.tensor([0, 20, 37], dtype=torch.int32), torch.tensor([0, 17, 37], dtype=torch.int32)
    with pytest.raises(SDPAttentionUnsupported, match="qkv_format 'sbhd'"):
        module(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu))
    with pytest.raises(SDPAttentionUnsupported, match="equal query/key bounds"):
        module(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=PackedSeqParams("thd", cu, other))
    with pytest.raises(SDPAttentionUnsupported, match="sliding-window"):
        SDPAttention(_tiny_config(4, 2, window_size=(8, 0)), 1, AttnMaskType.causal, "self", pg_collection=_stub_pg())
    # per-partition heads: 4 heads over 2 groups split across TP = 2 gives 2 heads sharing 1 group per rank
    tp2 = SDPAttention(_tiny_config(4, 2), 1, AttnMaskType.causal, "self", pg_collection=_stub_pg(2))
    assert (tp2.num_attention_heads_per_partition, tp2.num_query_groups_per_partition) == (2, 1)


def test_the_attention_key_is_validated_and_refuses_te_settings():
    from lcot_mega.actor.megatron_adapter import attention_backend, setup_errors
    from lcot_mega.config import ActorConfig, load_config

    refusal = "actor.attention = 'flash' is not allowed; choose one of: 'auto', 'sdpa', 'local'"
    with pytest.raises(Exception, match=re.escape(refusal)):
        load_config(overrides=["actor.attention=flash"])
    assert attention_backend(ActorConfig(attention="local")) == "local"
    if not torch.cuda.is_available():
        assert attention_backend(ActorConfig()) == "sdpa"  # the default without Transformer Engine
    errors = "\n".join(setup_errors(ActorConfig(attention="sdpa", fp8="e4m3"), 1))
    assert "actor.fp8 needs Transformer Engine's layer spec" in errors and "set actor.attention=auto" in errors


# ------------------------------------------------------------------------------------------------ whole actor


def _sequences(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Ragged prompts and responses up to 60 tokens: micro-batches pad the shorter ones."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 40), (3, 20), (12, 48), (7, 9)]
    return [
        (torch.randint(0, 96, (p,), generator=g).tolist(), torch.randint(0, 96, (r,), generator=g).tolist())
        for p, r in shapes
    ]


def _actor_logprobs(rank: int, world: int, models: dict, sequences) -> dict:
    """(layout, family, attention) -> this rank's per-sequence log-probs, and which core attention was built."""
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    out = {}
    for layout, tp in (("tp2", 2), ("tp1_dp2", 1)):
        for attention in ("sdpa", "local"):
            cfg = ActorConfig(tensor_parallel=tp, attention=attention, micro_batch_tokens=128)
            for family, (hf_dir, arch) in models.items():
                actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
                kinds = {type(m).__name__ for m in actor.chunks[0].modules() if "Attention" in type(m).__name__}
                out[layout, family, attention] = (actor.compute_logprobs(sequences), kinds)
            ma.destroy_parallel()
    return out


@torch.no_grad()
def _transformers_logprobs(hf_dir: str, sequences) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = []
    for prompt, response in sequences:
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]  # [R, V]
        out.append(logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0])
    return out


def test_actor_logprobs_with_sdpa_equal_the_local_path_and_transformers_at_tp1_and_tp2(tmp_path):
    from transformers import AutoConfig

    from lcot_mega.bridge.arch import arch_from_hf_config

    models = {}
    for family, heads_kv in (("qwen2", 2), ("llama", 4)):  # GQA with qkv bias, and MHA
        hf_dir = make_tiny_hf(tmp_path / family, family, num_key_value_heads=heads_kv, **SHARP_LONG)
        models[family] = (str(hf_dir), arch_from_hf_config(AutoConfig.from_pretrained(hf_dir)))
    sequences = _sequences()
    per_rank = run_gloo(_actor_logprobs, 2, models, sequences)
    with one_thread():
        expected = {f: _transformers_logprobs(d, sequences) for f, (d, _) in models.items()}
    for rank, results in enumerate(per_rank):
        for (layout, family, attention), (logprobs, kinds) in results.items():
            assert kinds == {"SelfAttention", "SDPAttention" if attention == "sdpa" else "DotProductAttention"}
            local = results[layout, family, "local"][0]
            for i, (got, want) in enumerate(zip(logprobs, expected[family], strict=True)):
                where = (rank, layout, family, attention, i)
                assert torch.allclose(got, want, rtol=0, atol=1e-5), (*where, (got - want).abs().max())
                assert torch.allclose(got, local[i], rtol=0, atol=1e-5), where


# ------------------------------------------------------------------------------------------------------ memory

_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)

    def peak_bytes():  # VmHWM: reset at exec (ru_maxrss keeps the parent's peak: an xdist worker's GBs)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024

    s, heads, groups, hn = 2048, 8, 2, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, 1, heads, hn, generator=g, requires_grad=True)
    k, v = (torch.randn(s, 1, groups, hn, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(s, 1, heads * hn, generator=g)
    if sys.argv[1] == "sdpa":
        from types import SimpleNamespace
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.transformer_config import TransformerConfig
        from lcot_mega.actor.sdpa_attention import SDPAttention
        config = TransformerConfig(num_layers=1, hidden_size=heads * hn, num_attention_heads=heads,
                                   num_query_groups=groups, kv_channels=hn, use_cpu_initialization=True,
                                   attention_dropout=0.0)
        pg = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
        attend = SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pg)
    else:  # eager softmax attention: stores [heads, s, s] scores and probabilities, as DotProductAttention does
        def attend(q, k, v, mask):
            n = q.size(0)
            kk, vv = (t.repeat_interleave(heads // groups, 2).permute(1, 2, 3, 0) for t in (k, v))
            scores = torch.matmul(q.permute(1, 2, 0, 3), kk) / hn**0.5
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            return torch.matmul(scores.softmax(-1), vv.transpose(-1, -2)).permute(2, 0, 1, 3).reshape(n, 1, -1)
    attend(q[:8], k[:8], v[:8], None).sum().backward()  # warm up the kernels' one-off allocations
    q.grad = k.grad = v.grad = None
    before = peak_bytes()
    attend(q, k, v, None).backward(grad)
    print(json.dumps(peak_bytes() - before))
    """
)


def _peak_growth_bytes(which: str) -> int:
    """Growth of the peak resident memory over one forward + backward, measured in a fresh process."""
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, which], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_forward_backward_memory_stays_far_below_one_heads_by_s_by_s_tensor():
    probs_bytes = 8 * 2048 * 2048 * 4  # one fp32 [heads, s, s] tensor: 128 MiB
    eager = _peak_growth_bytes("eager")
    assert eager >= probs_bytes  # the measurement sees quadratic attention (scores and probabilities: 2x)
    sdpa = _peak_growth_bytes("sdpa")
    assert sdpa < probs_bytes / 4, (sdpa / 2**20, eager / 2**20)
