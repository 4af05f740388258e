"""Per-slot LoRA against a float64 loop: every row adds its own slot's scale * x down^T up^T."""
from __future__ import annotations

import torch

from humanref.attention.lora import slot_lora_delta

DT = torch.float64


def naive_delta(x, down, up, scale):
    """Row by row, token by token: scale * sum_r up[c, r] * sum_k down[r, k] x[k]."""
    rows, n, c = x.shape
    out = torch.zeros(rows, n, c, dtype=DT)
    for b in range(rows):
        for i in range(n):
            hidden = [sum(float(down[b, r, k]) * float(x[b, i, k]) for k in range(c)) for r in range(down.shape[1])]
            for j in range(c):
                out[b, i, j] = scale * sum(float(up[b, j, r]) * hidden[r] for r in range(len(hidden)))
    return out


def test_slot_lora_delta_matches_the_per_row_loop():
    g = torch.Generator().manual_seed(0)
    rows, n, c, rank = 3, 4, 6, 2
    x = torch.randn(rows, n, c, generator=g, dtype=DT)
    down = torch.randn(rows, rank, c, generator=g, dtype=DT)
    up = torch.randn(rows, c, rank, generator=g, dtype=DT)
    out = slot_lora_delta(x, down, up, 0.75)
    torch.testing.assert_close(out, naive_delta(x, down, up, 0.75), rtol=0, atol=1e-12)
    # each row uses only its own slot: changing row 1's weights leaves rows 0 and 2 alone
    down2 = down.clone()
    down2[1] += 1.0
    other = slot_lora_delta(x, down2, up, 0.75)
    assert torch.equal(other[0], out[0]) and torch.equal(other[2], out[2])
    assert (other[1] - out[1]).abs().max() > 1e-3


def test_slot_lora_delta_hand_computed():
    x = torch.tensor([[[1.0, 2.0]]], dtype=DT)  # one row, one token, C = 2
    down = torch.tensor([[[3.0, -1.0]]], dtype=DT)  # rank 1: down(x) = 3 - 2 = 1
    up = torch.tensor([[[2.0], [0.5]]], dtype=DT)  # up(1) = (2, 0.5)
    assert slot_lora_delta(x, down, up, 2.0).tolist() == [[[4.0, 1.0]]]
