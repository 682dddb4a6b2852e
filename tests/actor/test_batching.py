"""Dynamic-batch-size micro-batches: token budget, response mask, original order, equal counts per rank."""

from __future__ import annotations

import pytest
import torch

from lcot_mega.actor.batching import (
    collate,
    from_token_layout,
    make_micro_batches,
    pack_by_tokens,
    plan_micro_batches,
    split_across_ranks,
    to_token_layout,
)


def _sequences(lengths: list[tuple[int, int]]) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) with distinct token ids, so a misplaced token is visible."""
    out, tok = [], 1
    for p, r in lengths:
        out.append((list(range(tok, tok + p)), list(range(tok + p, tok + p + r))))
        tok += p + r
    return out


def test_every_micro_batch_respects_the_token_budget_unless_one_sequence_exceeds_it():
    lengths = [5, 17, 3, 9, 9, 12, 40, 1, 8, 8]
    for budget in (1, 8, 16, 20, 40, 64, 1000):
        batches = pack_by_tokens(lengths, range(len(lengths)), budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            padded = max(lengths[i] for i in b) * len(b)
            assert padded <= budget or len(b) == 1


def test_packing_sorts_longest_first_and_fills_greedily():
    # lengths 4, 3, 3, 2, 1 with budget 9: [4, 3] (4 * 2 = 8; a third row would be 12), [3, 2, 1] (3 * 3 = 9)
    assert pack_by_tokens([3, 4, 1, 3, 2], range(5), 9) == [[1, 0], [3, 4, 2]]


def test_ranks_are_balanced_by_tokens():
    # longest first onto the least loaded rank: 30 -> r0; 8, 8, 7 -> r1 (8, 16, 23); 7 -> r1 (30); 1 -> r0
    assert split_across_ranks([8, 30, 7, 8, 7, 1], 2) == [[1, 5], [0, 3, 2, 4]]
    assert split_across_ranks([], 3) == [[], [], []]


def test_short_ranks_get_empty_micro_batches_so_every_rank_runs_the_same_count():
    # budget 32: r0 holds 30 and 1, two micro-batches (30 * 2 > 32); r1 holds 8, 8, 7, 7, one micro-batch
    # (8 * 4 = 32), so it gets an empty second one
    plan = plan_micro_batches([8, 30, 7, 8, 7, 1], 2, 32)
    assert plan == [[[1], [5]], [[0, 3, 2, 4], []]]
    assert [len(p) for p in plan_micro_batches([5], 3, 100)] == [1, 1, 1]  # 2 ranks without any sequence
    # the interleaved pipeline schedule needs a multiple of the pipeline size
    assert [len(p) for p in plan_micro_batches([5, 5, 5], 1, 5, count_multiple=4)] == [4]


def test_collate_pads_right_and_masks_exactly_the_positions_that_predict_response_tokens():
    seqs = _sequences([(2, 3), (3, 0), (1, 1)])  # ([1, 2], [3, 4, 5]), ([6, 7, 8], []), ([9], [10])
    mb = collate(seqs, [0, 1, 2])
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0], [9, 10, 0, 0, 0]]
    assert mb.labels.tolist() == [[2, 3, 4, 5, 0], [7, 8, 0, 0, 0], [10, 0, 0, 0, 0]]
    # row 0: positions 1, 2, 3 predict response tokens 3, 4, 5; row 1 has no response; row 2: position 0
    assert mb.loss_mask.int().tolist() == [[0, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert mb.labels[mb.loss_mask].tolist() == [3, 4, 5, 10]
    assert mb.position_ids.tolist() == [list(range(5))] * 3
    assert mb.indices == (0, 1, 2) and mb.num_rows == 3


def test_an_empty_micro_batch_holds_one_dummy_token_and_no_rows():
    mb = collate(_sequences([(2, 2)]), [])
    assert mb.input_ids.shape == (1, 1) and mb.num_rows == 0 and not mb.loss_mask.any()
    assert mb.rows(mb.loss_mask).shape == (0, 1)


def test_results_scatter_back_to_the_original_order_on_every_rank():
    lengths = [(3, 4), (2, 9), (5, 1), (1, 6), (4, 4), (2, 2), (6, 3)]
    seqs = _sequences(lengths)
    values = [torch.arange(r, dtype=torch.float32) + 100 * i for i, (_, r) in enumerate(lengths)]
    for world in (1, 2, 3):
        seen = {}
        counts = set()
        for rank in range(world):
            mbs = make_micro_batches(seqs, rank, world, max_tokens=16)
            counts.add(len(mbs))
            for mb in mbs:
                rows = mb.rows(mb.input_ids)
                assert rows.shape[0] * rows.shape[1] <= 16 or mb.num_rows == 1
                for i, v in zip(mb.indices, from_token_layout(to_token_layout(values, mb), mb), strict=True):
                    seen[i] = v
                # the response tokens themselves come back in order too
                labels = from_token_layout(mb.rows(mb.labels).float(), mb)
                for i, lab in zip(mb.indices, labels, strict=True):
                    assert lab.long().tolist() == seqs[i][1]
        assert len(counts) == 1, f"world {world}: unequal micro-batch counts {counts}"
        assert sorted(seen) == list(range(len(seqs)))
        for i, v in enumerate(values):
            assert torch.equal(seen[i], v)


def test_scalar_values_broadcast_over_the_response_and_lengths_are_checked():
    seqs = _sequences([(2, 3), (1, 2)])
    mb = collate(seqs, [1, 0])
    assert to_token_layout([0.5, -2.0], mb).tolist() == [[-2.0, -2.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.5, 0.0]]
    with pytest.raises(ValueError, match="sequence 0: 2 values for 3 response tokens"):
        to_token_layout([torch.zeros(2), torch.zeros(2)], mb)


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="sequence 1 has an empty prompt"):
        make_micro_batches([([1], [2]), ([], [3])], 0, 1, 8)


def test_packed_budgets_count_real_tokens_first_fit_longest_first():
    # padded, [9, 9, 8] costs 27 > 26 so it splits; packed, 9 + 9 + 8 = 26 fits, and 5 + 3 fill the next one
    lengths = [5, 9, 3, 9, 8]
    assert pack_by_tokens(lengths, range(5), 26) == [[1, 3], [4, 0, 2]]
    assert pack_by_tokens(lengths, range(5), 26, packed=True) == [[1, 3, 4], [0, 2]]
    # first fit: a later short sequence goes back into an earlier micro-batch with room
    assert pack_by_tokens([10, 7, 6, 2], range(4), 12, packed=True) == [[0, 3], [1], [2]]
    for budget in (9, 12, 20, 100):
        for batch in pack_by_tokens(lengths, range(5), budget, packed=True):
            assert sum(lengths[i] for i in batch) <= budget or len(batch) == 1


def test_a_packed_micro_batch_lays_sequences_end_to_end_and_maps_back_to_rows():
    seqs = _sequences([(3, 2), (1, 4), (2, 0)])
    (padded,) = make_micro_batches(seqs, 0, 1, 100)
    (mb,) = make_micro_batches(seqs, 0, 1, 100, packed=True)
    order = [seqs[i][0] + seqs[i][1] for i in mb.indices]  # longest first: sequences 1 (5), 0 (5), 2 (2)
    assert mb.input_ids.tolist() == [[tok for seq in order for tok in seq]]  # no padding at all
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]]
    assert mb.packed.cu_seqlens.tolist() == [0, 5, 10, 12] and mb.packed.max_seqlen == 5
    # the loss still sees one padded row per sequence, and token_index finds each row's tokens in the packed row
    assert torch.equal(mb.loss_mask, padded.loss_mask) and torch.equal(mb.labels, padded.labels)
    mask = mb.loss_mask
    assert torch.equal(mb.input_ids[0, mb.packed.token_index][mask], padded.input_ids[mask])
    output = torch.arange(12.0).reshape(1, 12, 1) * 10  # a stand-in model output per packed position
    assert mb.response_states(output)[:, 0].tolist() == (mb.packed.token_index[mask] * 10.0).tolist()
    # an empty micro-batch (a rank with nothing to do) stays unpacked: one dummy token
    empty = make_micro_batches(seqs[:1], 1, 2, 100, packed=True)[0]
    assert empty.num_rows == 0 and empty.packed is None


def test_packing_refuses_uniform_shapes():
    with pytest.raises(ValueError, match="uniform shape"):
        make_micro_batches(_sequences([(2, 2)]), 0, 1, 100, uniform_shape=True, packed=True)
