"""CFG chunk gating: which rows of a batch belong to the cond or the uncond chunk.

ComfyUI batches conds as chunks listed in ``cond_or_uncond`` (0 = positive, 1 = negative), usually [1, 0],
but [0] at CFG 1, [1] then [0] under memory pressure, or [1, 0, 0] with several cond entries: never assume two.
"""
from __future__ import annotations

from typing import Optional, Sequence

COND, UNCOND = 0, 1


def chunk_slices(cond_or_uncond: Optional[Sequence[int]], batch: int) -> list[tuple[slice, int]]:
    """Row slices per chunk with their kind; without chunk information the whole batch counts as cond."""
    if not cond_or_uncond:
        return [(slice(0, batch), COND)]
    n = len(cond_or_uncond)
    if batch % n != 0:
        raise ValueError(f"batch of {batch} rows cannot be split into {n} CFG chunks {list(cond_or_uncond)}")
    per = batch // n
    return [(slice(i * per, (i + 1) * per), int(kind)) for i, kind in enumerate(cond_or_uncond)]
