"""The supervised objective (`TrainBatch.sft`) is the cross entropy of the response tokens only: its loss and
gradient equal a masked cross entropy computed by hand from transformers' logits, at TP1, TP2, PP2 and DP2, packed
or not, and the prompt tokens get no loss."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tensor_helpers import one_thread
from helpers.tiny_models import make_tiny_hf

from lcot_mega.actor.train_step import TrainBatch
from lcot_mega.bridge.arch import arch_from_hf_config
from lcot_mega.config import ActorConfig, AlgoConfig

pytest.importorskip("megatron.core")

ADAM = dict(lr=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-4, grad_clip=1.0, weight_decay=0.0)
SHAPES = [(3, 12), (1, 5), (7, 0), (2, 9), (5, 1), (4, 7)]  # (prompt, response) lengths; one empty response


def _sequences() -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randint(0, 96, (p,), generator=g).tolist(), torch.randint(0, 96, (r,), generator=g).tolist())
        for p, r in SHAPES
    ]


def _hand_cross_entropy(hf_dir: str, sequences) -> tuple[float, float]:
    """(mean over response tokens of -log softmax(logits)[next token], grad norm of it): one forward per
    sequence, the log-softmax written out as z - logsumexp(z), prompt positions never counted."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    total, count = torch.zeros(()), 0
    for prompt, response in sequences:
        if not response:
            continue
        ids = torch.tensor([prompt + response])
        z = model(ids).logits[0, len(prompt) - 1 : -1]  # [R, V]: the positions that predict response tokens
        nll = z.logsumexp(-1) - z.gather(-1, torch.tensor(response)[:, None])[:, 0]
        total, count = total + nll.sum(), count + len(response)
    loss = total / count
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), float(norm)


def _worker(rank: int, world: int, hf_dir: str, layouts: list, sequences) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    out = {}
    for name, tp, pp, extra in layouts:
        cfg = ActorConfig(tensor_parallel=tp, pipeline_parallel=pp, micro_batch_tokens=24, **(ADAM | extra))
        actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
        batch = TrainBatch.sft([p for p, _ in sequences], [r for _, r in sequences])
        out[name] = actor.train_step(batch)
        ma.destroy_parallel()
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_tiny_hf(tmp_path_factory.mktemp("sft"), "llama"))


def test_sft_loss_and_gradient_equal_a_hand_computed_masked_cross_entropy(model):
    sequences = _sequences()
    with one_thread():
        want_loss, want_norm = _hand_cross_entropy(model, sequences)
    layouts = [("tp1", 1, 1, {}), ("tp1_packed", 1, 1, dict(pack_sequences=True, logits_chunk_tokens=5))]
    (got,) = run_gloo(_worker, 1, model, layouts, sequences)
    tokens = sum(len(r) for _, r in sequences)
    for name, m in got.items():
        assert m["actor/loss"] == pytest.approx(want_loss, rel=1e-5), name
        assert m["actor/grad_norm"] == pytest.approx(want_norm, rel=1e-4), name
        assert m["actor/response_tokens"] == tokens and m["actor/update_ok"] == 1.0, name
        assert m["actor/micro_batches"] >= 2, name  # the global denominator spans micro-batches
    assert 3.0 < want_loss < 6.0  # about log(96) for a random model: a real cross entropy, not a surrogate's 0


def test_the_prompt_tokens_carry_no_loss(model):
    """Changing a prompt's last token changes the response's context, so the loss moves; appending the same
    tokens to the prompt instead of the response removes them from the loss entirely."""
    prompt, response = [5, 6, 7], [8, 9, 10, 11]
    layouts = [("tp1", 1, 1, {})]
    as_response = run_gloo(_worker, 1, model, layouts, [(prompt, response)])[0]["tp1"]
    as_prompt = run_gloo(_worker, 1, model, layouts, [(prompt + response[:2], response[2:])])[0]["tp1"]
    with one_thread():
        want_all = _hand_cross_entropy(model, [(prompt, response)])[0]
        want_tail = _hand_cross_entropy(model, [(prompt + response[:2], response[2:])])[0]
    assert as_response["actor/loss"] == pytest.approx(want_all, rel=1e-5)
    assert as_prompt["actor/loss"] == pytest.approx(want_tail, rel=1e-5)
    assert as_prompt["actor/response_tokens"] == 2 and abs(want_all - want_tail) > 1e-3


def test_sft_step_is_the_same_at_tp2_pp2_dp2(model):
    sequences = _sequences()
    with one_thread():
        want_loss, want_norm = _hand_cross_entropy(model, sequences)
    layouts = [("tp2", 2, 1, {}), ("pp2", 1, 2, {}), ("dp2", 1, 1, {}), ("dp2_packed", 1, 1, dict(pack_sequences=True))]
    for rank_metrics in run_gloo(_worker, 2, model, layouts, sequences):
        for name, m in rank_metrics.items():
            assert m["actor/loss"] == pytest.approx(want_loss, rel=1e-5), name
            assert m["actor/grad_norm"] == pytest.approx(want_norm, rel=1e-4), name


def test_train_batch_objective_is_checked():
    with pytest.raises(ValueError, match="objective must be 'policy' or 'sft'"):
        TrainBatch([[1]], [[2]], [0.0], objective="dpo")
