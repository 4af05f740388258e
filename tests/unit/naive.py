"""Naive float64 references shared by the unit tests: explicit per-head softmax, explicit x W^T (+ b)."""
from __future__ import annotations

import math

import torch
from torch import nn

DT = torch.float64


def naive_attention(q, k, v, heads, logit_bias=None, mass=None):
    """Per-batch, per-head softmax attention with explicit exp / sum.

    ``logit_bias`` [Nk] is added to the scaled logits; ``mass`` [Nk] multiplies each key's exp(logit).
    """
    b, nq, c = q.shape
    d = c // heads
    out = torch.zeros(b, nq, c, dtype=DT)
    for bi in range(b):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            qh, kh, vh = q[bi, :, cols].to(DT), k[bi, :, cols].to(DT), v[bi, :, cols].to(DT)
            logits = (qh @ kh.T) / math.sqrt(d)
            if logit_bias is not None:
                logits = logits + logit_bias.to(DT)[None, :]
            e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            if mass is not None:
                e = e * mass.to(DT)[None, :]
            p = e / e.sum(dim=1, keepdim=True)
            out[bi, :, cols] = p @ vh
    return out


def linear(seed: int, bias: bool, c: int) -> nn.Linear:
    """A float64 linear layer with seeded weights (and a non-zero bias when asked)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(c, c, bias=bias, dtype=DT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(c, c, generator=g, dtype=DT) / math.sqrt(c))
        if bias:
            lin.bias.copy_(0.5 * torch.randn(c, generator=g, dtype=DT))
    return lin


def proj(lin: nn.Linear, t: torch.Tensor) -> torch.Tensor:
    """Explicit x W^T (+ b), independent of nn.Linear.forward."""
    out = t @ lin.weight.detach().T
    if lin.bias is not None:
        out = out + lin.bias.detach()
    return out
