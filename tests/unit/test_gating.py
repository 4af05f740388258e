"""CFG chunk gating: row slices per chunk, written out by hand."""
from __future__ import annotations

import pytest

from humanref.attention import gating as G


def test_kinds_are_comfy_conventions():
    assert (G.COND, G.UNCOND) == (0, 1)


@pytest.mark.parametrize(
    "layout,batch,expected",
    [
        ([1, 0], 4, [(slice(0, 2), 1), (slice(2, 4), 0)]),
        ([1, 0], 2, [(slice(0, 1), 1), (slice(1, 2), 0)]),
        ([0], 3, [(slice(0, 3), 0)]),
        ([1], 3, [(slice(0, 3), 1)]),
        ([1, 0, 0], 6, [(slice(0, 2), 1), (slice(2, 4), 0), (slice(4, 6), 0)]),
        ((0, 1), 2, [(slice(0, 1), 0), (slice(1, 2), 1)]),
        (None, 5, [(slice(0, 5), 0)]),
        ([], 4, [(slice(0, 4), 0)]),
    ],
)
def test_chunk_slices(layout, batch, expected):
    got = G.chunk_slices(layout, batch)
    assert got == expected
    assert all(type(kind) is int for _, kind in got)
    # the slices tile the batch exactly
    rows = [r for sl, _ in got for r in range(batch)[sl]]
    assert rows == list(range(batch))


@pytest.mark.parametrize("layout,batch", [([1, 0], 5), ([1, 0, 0], 4), ([1, 0], 1)])
def test_chunk_slices_indivisible_batch(layout, batch):
    with pytest.raises(ValueError, match=rf"batch of {batch} rows cannot be split into {len(layout)} CFG chunks"):
        G.chunk_slices(layout, batch)
