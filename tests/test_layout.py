"""The layout owns the flat vector: flatten and unflatten are inverse, range by range."""

import numpy as np
import pytest
import torch

from fedprune.models import Layout, layout


def test_flatten_unflatten_round_trip_whole_and_per_block(tiny_model):
    lay = layout(tiny_model)
    gen = torch.Generator().manual_seed(0)
    masks = {s.name: torch.rand(s.shape, generator=gen) < 0.5 for s in lay.slots}
    vector = lay.flatten(masks)
    assert vector.shape == (lay.total,) and vector.dtype == bool
    back = lay.unflatten(vector)
    assert list(back) == [s.name for s in lay.slots]
    assert all(np.array_equal(back[n], masks[n].numpy()) for n in masks)
    for block in range(lay.num_blocks):
        offset, length = lay.block_range(block)
        part = lay.flatten(masks, lay.block_slots(block))
        assert np.array_equal(part, vector[offset : offset + length])
        assert list(lay.unflatten(part, offset)) == [s.name for s in lay.block_slots(block)]


def test_from_shapes_lays_slots_end_to_end_and_refuses_a_cut_slot():
    lay = Layout.from_shapes([("a", 0, (2, 3)), ("b", 0, (4, 1)), ("c", 1, (1, 2))])
    assert [s.offset for s in lay.slots] == [0, 6, 10] and lay.total == 12
    assert [s.name for s in lay.slots_in(6, 6)] == ["b", "c"]
    got = lay.unflatten(np.arange(6, 12), offset=6)
    assert got["b"].tolist() == [[6], [7], [8], [9]] and got["c"].tolist() == [[10, 11]]
    with pytest.raises(ValueError, match="cuts slot b"):
        lay.unflatten(np.arange(8), offset=0)
