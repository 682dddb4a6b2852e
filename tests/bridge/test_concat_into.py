"""`concat_tp_into`: the TP slices of a weight written straight into an engine's parameter equal `concat_tp`'s full
tensor (cast to the parameter's dtype), and a slice set that does not make the parameter's shape leaves it untouched."""

from __future__ import annotations

import pytest
import torch

from lcot_mega.bridge.mapping import COLUMN, REPLICATED, ROW, VOCAB, Rule, concat_tp, concat_tp_into


def _slices(shape: tuple[int, ...], dim: int, parts: int) -> list[torch.Tensor]:
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) / 7
    return list(torch.chunk(full, parts, dim=dim))


@pytest.mark.parametrize(("layout", "dim"), [(COLUMN, 0), (ROW, 1)])
def test_column_and_row_slices_land_where_concat_puts_them(layout, dim):
    rule = Rule(layout, ("w",))
    pieces = _slices((6, 4), dim, 2)
    out = torch.full((6, 4), -1.0)
    assert concat_tp_into(rule, pieces, out)
    assert torch.equal(out, concat_tp(rule, pieces))
    assert torch.equal(out, torch.cat(pieces, dim=dim))  # the layout by hand: rank 0's slice first


def test_vocab_padding_beyond_the_engines_rows_is_dropped_as_hf_rows_does():
    rule = Rule(VOCAB, ("model.embed_tokens.weight",))
    pieces = _slices((8, 3), 0, 2)  # 97 -> 98 rows padded on load, here 7 -> 8
    out = torch.zeros(7, 3)
    assert concat_tp_into(rule, pieces, out)
    assert torch.equal(out, concat_tp(rule, pieces, hf_rows=7)) and torch.equal(out, torch.cat(pieces)[:7])


def test_a_cast_happens_in_the_copy_and_replicated_tensors_are_copied_whole():
    pieces = _slices((4, 2), 0, 2)
    out = torch.zeros(4, 2, dtype=torch.bfloat16)
    assert concat_tp_into(Rule(COLUMN, ("w",)), pieces, out)
    assert torch.equal(out, torch.cat(pieces).to(torch.bfloat16))
    norm = torch.zeros(5)
    assert concat_tp_into(Rule(REPLICATED, ("n",)), [torch.ones(5)], norm) and torch.equal(norm, torch.ones(5))


@pytest.mark.parametrize(
    ("rule", "pieces", "shape"),
    [
        (Rule(COLUMN, ("w",)), _slices((6, 4), 0, 2), (8, 4)),  # too few rows
        (Rule(COLUMN, ("w",)), _slices((6, 4), 0, 2), (4, 4)),  # too many rows, and not a vocabulary
        (Rule(ROW, ("w",)), _slices((6, 4), 1, 2), (6, 5)),
        (Rule(COLUMN, ("w",)), _slices((6, 4), 0, 2), (6, 3)),  # the other dimension differs
        (Rule(REPLICATED, ("n",)), [torch.ones(5)], (4,)),
    ],
)
def test_slices_that_do_not_make_the_parameters_shape_leave_it_untouched(rule, pieces, shape):
    out = torch.full(shape, -1.0)
    assert not concat_tp_into(rule, pieces, out)
    assert torch.equal(out, torch.full(shape, -1.0))


@pytest.mark.parametrize(("layout", "dim", "rows"), [(COLUMN, 0, 6), (ROW, 1, 6), (VOCAB, 0, 5)])
def test_each_rank_writing_only_its_own_slice_adds_up_to_the_whole(layout, dim, rows):
    """Shard to shard: rank r writes slice r alone, knowing the others' shapes only (meta tensors)."""
    rule = Rule(layout, ("w",))
    pieces = _slices((6, 4), dim, 3)
    shape = (rows, 4) if dim == 0 else (6, 4)
    want = torch.full(shape, -1.0)
    assert concat_tp_into(rule, pieces, want)
    out = torch.full(shape, -1.0)
    for r in range(3):
        shapes_only = [p if i == r else p.to("meta") for i, p in enumerate(pieces)]
        assert concat_tp_into(rule, shapes_only, out, only=r)
        written = torch.zeros(shape, dtype=torch.bool)
        written.narrow(dim, 2 * r, max(0, min(2, shape[dim] - 2 * r))).fill_(True)
        assert torch.equal(out[written], want[written])  # slice r is in place now
    assert torch.equal(out, want)
    norm = torch.zeros(5)
    assert concat_tp_into(Rule(REPLICATED, ("n",)), [torch.ones(5)], norm, only=1) and torch.equal(norm, torch.zeros(5))
    assert concat_tp_into(Rule(REPLICATED, ("n",)), [torch.ones(5)], norm, only=0) and torch.equal(norm, torch.ones(5))
