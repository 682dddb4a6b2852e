"""Context parallelism (actor.context_parallel): the load-balanced split, its inverse, the true rotary positions of
each rank's tokens, and the sdpa attention over CP ranks equal to attention over the whole sequence."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.distributed_harness import run_gloo

from lcot_mega.actor.batching import collate, make_micro_batches, pack
from lcot_mega.actor.context_parallel import (
    SequenceSplit,
    padded_length,
    rank_chunks,
    rank_positions,
    restore_order,
    split_sequence,
)

pytest.importorskip("megatron.core")


def test_rank_r_holds_chunks_r_and_2cp_minus_1_minus_r():
    assert rank_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert rank_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert rank_chunks(4, 1) == (1, 6)
    assert rank_positions(12, 3, 2).tolist() == [4, 5, 6, 7]  # chunks 2 and 3 of six
    with pytest.raises(ValueError, match="divisible by 4"):
        rank_positions(10, 2, 0)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_split_then_restore_is_the_identity_on_any_dimension(cp):
    length = padded_length(37, cp)
    x = torch.randn(3, length, 5)
    for dim, t in ((1, x), (0, x.transpose(0, 1).contiguous())):
        parts = [split_sequence(t, cp, r, dim) for r in range(cp)]
        assert torch.equal(restore_order(torch.cat(parts, dim), cp, dim), t)
    positions = torch.cat([rank_positions(length, cp, r) for r in range(cp)])
    assert sorted(positions.tolist()) == list(range(length))  # every position on exactly one rank


@pytest.mark.parametrize("cp", [2, 3, 4, 8])
def test_every_rank_gets_the_same_tokens_and_the_same_causal_work(cp):
    length = padded_length(1000, cp)
    tokens = [rank_positions(length, cp, r).numel() for r in range(cp)]
    # a query at position p attends p + 1 keys under the causal mask
    work = [int((rank_positions(length, cp, r) + 1).sum()) for r in range(cp)]
    assert len(set(tokens)) == 1 and tokens[0] * cp == length
    assert len(set(work)) == 1 and work[0] * cp == length * (length + 1) // 2
    # contiguous pieces instead: the last rank would do 2 * cp - 1 times the first rank's work
    contiguous = [sum(range(r * length // cp + 1, (r + 1) * length // cp + 1)) for r in range(cp)]
    assert contiguous[-1] / contiguous[0] > 2 * cp - 2


def test_padded_length_and_micro_batches_padded_to_a_multiple_of_2cp():
    assert [padded_length(n, 2) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
    assert padded_length(7, 1) == 8  # a multiple of 2 (the caller skips the split at CP 1)
    mb = collate([([1, 2, 3], [4, 5])], [0], length_multiple=4)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert mb.loss_mask.tolist() == [[False, False, True, True, False, False, False, False]]
    batches = make_micro_batches([([1], [2, 3]), ([4, 5, 6], [7, 8, 9, 1])], 0, 1, 100, length_multiple=6)
    assert [b.input_ids.shape[1] for b in batches] == [12]
    # packed (sequence parallelism): the row is rounded up by one more segment of pad tokens
    (packed,) = make_micro_batches([([1], [2]), ([3, 4], [5])], 0, 1, 100, packed=True, length_multiple=4)
    assert packed.input_ids.tolist() == [[3, 4, 5, 1, 2, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert packed.packed.cu_seqlens.tolist() == [0, 3, 5, 8] and packed.packed.max_seqlen == 3
    assert packed.packed.token_index.tolist() == [[0, 1, 2, 0], [3, 4, 0, 0]]  # the real tokens where they were


def test_local_micro_batch_holds_this_ranks_positions():
    mb = collate([([1, 2, 3], [4, 5, 6, 7, 8])], [0], length_multiple=4)
    assert SequenceSplit().local(mb) is mb
    local = SequenceSplit(2, 1).local(mb)  # positions 2..5
    assert local.input_ids.tolist() == [[3, 4, 5, 6]]
    assert local.position_ids.tolist() == [[2, 3, 4, 5]]
    assert local.labels.tolist() == [[4, 5, 6, 7]]
    assert local.loss_mask.tolist() == [[True, True, True, True]]
    assert local.indices == mb.indices
    with pytest.raises(ValueError, match="packed micro-batches are not split"):
        SequenceSplit(2, 0).local(pack(mb, [8]))


def test_megatron_rotary_embedding_gives_each_rank_the_positions_of_its_tokens():
    """megatron-core's RoPE slices its embedding per CP rank without looking at position ids: the positions it
    uses must be exactly `rank_positions` (the rotary angle of each token is its true position times inv_freq)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from lcot_mega.actor import cpu_compat

    cpu_compat.enable()  # megatron pins the chunk indices to a CUDA device
    length, cp = 24, 3
    for r in range(cp):
        group = SimpleNamespace(size=lambda: cp, rank=lambda r=r: r)
        rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True, cp_group=group)
        full = rope.get_emb(length)  # [s, 1, 1, d], positions 0 .. s - 1
        local = rope(length)  # what each layer applies on rank r
        assert torch.equal(local, full[rank_positions(length, cp, r)])
        angles = rank_positions(length, cp, r).float().outer(rope.inv_freq)  # [s / cp, d / 2]
        assert torch.allclose(local[:, 0, 0, : angles.shape[1]], angles)


# --------------------------------------------------------------------------------- sdpa attention over CP ranks

SEQ, BATCH, HEADS, GROUPS, HEAD_DIM = 24, 2, 4, 2, 16


def _attention_config(cp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=2,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        context_parallel_size=cp,
        attention_dropout=0.0,  # megatron's default 0.1 would make the two runs differ
        use_cpu_initialization=True,
        masked_softmax_fusion=False,
    )


def _attention(cp: int, q, k, v, grad, split) -> list[torch.Tensor]:
    """SDPAttention's output and q/k/v gradients on this rank's part of the whole-sequence inputs."""
    from megatron.core.transformer.enums import AttnMaskType

    from lcot_mega.actor.sdpa_attention import SDPAttention

    module = SDPAttention(_attention_config(cp), 1, AttnMaskType.causal, "self")
    leaves = [split(t).detach().requires_grad_() for t in (q, k, v)]
    out = module(*leaves, None)
    out.backward(split(grad))
    return [out.detach(), *(t.grad for t in leaves)]


def _attention_cp_vs_whole(rank: int, world: int) -> tuple[list, list]:
    """This CP rank's attention outputs and input gradients, and those of attention over the whole sequence."""
    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.config import ActorConfig

    torch.set_num_threads(1)
    layout = ma.init_parallel(ActorConfig(context_parallel=world), seed=1)
    g = torch.Generator().manual_seed(3)  # the same whole-sequence inputs on every rank
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=g)
    k, v = (torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=g) for _ in range(2))
    grad = torch.randn(SEQ, BATCH, HEADS * HEAD_DIM, generator=g)

    def mine(t: torch.Tensor) -> torch.Tensor:
        return split_sequence(t, layout.cp_size, layout.cp_rank, dim=0)

    got = _attention(world, q, k, v, grad, mine)
    want = [mine(t) for t in _attention(1, q, k, v, grad, lambda t: t)]  # no CP group: the whole sequence here
    ma.destroy_parallel()
    return got, want


def test_sdpa_attention_over_two_cp_ranks_equals_attention_over_the_whole_sequence():
    """Output and the gradients of q, k and v (the keys' summed back from the other rank's queries) on each CP
    rank equal that rank's part of single-process attention, to 1e-5."""
    for rank, (got, want) in enumerate(run_gloo(_attention_cp_vs_whole, 2)):
        for what, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert a.shape == b.shape, (rank, what)
            assert torch.allclose(a, b, rtol=0, atol=1e-5), (rank, what, (a - b).abs().max())
