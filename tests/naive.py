"""Naive references shared by every tier, one per concept: float64 loops with explicit per-head softmax,
explicit x W^T (+ b), the Parts2Whole mask rule cell by cell, the official pose guider as plain conv2d calls."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def naive_attention_probs(q, k, heads, logit_bias=None, allowed=None):
    """The softmax probabilities of :func:`naive_attention`, [B, heads, Nq, Nk], query by query.

    ``allowed`` [Nq, Nk] bool: the keys each query may see (the others get 0; a query that sees none, all 0).
    """
    b, nq, c = q.shape
    d = c // heads
    out = torch.zeros(b, heads, nq, k.shape[1], dtype=DT)
    for bi in range(b):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            logits = (q[bi, :, cols].to(DT) @ k[bi, :, cols].to(DT).T) / math.sqrt(d)
            if logit_bias is not None:
                logits = logits + logit_bias.to(DT)[None, :]
            for i in range(nq):
                keys = torch.arange(k.shape[1]) if allowed is None else allowed[i].nonzero().flatten()
                if keys.numel() == 0:
                    continue
                e = torch.exp(logits[i, keys] - logits[i, keys].max())
                out[bi, h, i, keys] = e / e.sum()
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


def naive_parts2whole(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The Parts2Whole mask rule: [R, H, W] pixel masks -> [R, h * w] token weights on the block's grid.

    Nearest resize (source index floor(i*H/h)), 3x3 box sum with zero padding, clamp to [0,1], flatten.
    """
    r, big_h, big_w = mask.shape
    h, w = grid
    out = torch.zeros(r, h * w, dtype=DT)
    for ri in range(r):
        small = [[float(mask[ri, (i * big_h) // h, (j * big_w) // w]) for j in range(w)] for i in range(h)]
        for i in range(h):
            for j in range(w):
                s = 0.0
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        ii, jj = i + di, j + dj
                        if 0 <= ii < h and 0 <= jj < w:
                            s += small[ii][jj]
                out[ri, i * w + j] = min(max(s, 0.0), 1.0)
    return out


def pose_guider_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The official pose guider in x's dtype: conv_in + SiLU, then (3x3 conv, SiLU, stride-2 3x3 conv, SiLU) per
    step, then conv_out."""
    p = {k: v.to(x.dtype) for k, v in sd.items()}
    x = F.silu(F.conv2d(x, p["conv_in.weight"], p["conv_in.bias"], padding=1))
    for i in range(6):
        x = F.silu(F.conv2d(x, p[f"blocks.{i}.weight"], p[f"blocks.{i}.bias"], stride=1 + i % 2, padding=1))
    return F.conv2d(x, p["conv_out.weight"], p["conv_out.bias"], padding=1)


def naive_adain(x, ref_maps, ref_weights, weights, eps=1e-6):
    """A1111 / ACN reference_adain, written out: per row and channel, the population mean and deviation over
    the pixels (a reference's over its mask weights), then x + w (AdaIN_r(x) - x) averaged over references.

    ``x`` [B, C, H, W]; ``ref_maps`` [C, H, W] each; ``ref_weights`` [H, W] or None each; ``weights`` floats.
    """
    x = x.to(DT)
    out = torch.zeros_like(x)
    b, c = x.shape[:2]
    for ref, mask, w in zip(ref_maps, ref_weights, weights):
        ref = ref.to(DT)
        m = torch.ones(ref.shape[1:], dtype=DT) if mask is None else mask.to(DT)
        for bi in range(b):
            for ch in range(c):
                xs = x[bi, ch]
                mu_x = xs.sum() / xs.numel()
                var_x = ((xs - mu_x) ** 2).sum() / xs.numel()
                mu_r = (ref[ch] * m).sum() / m.sum()
                var_r = (((ref[ch] - mu_r) ** 2) * m).sum() / m.sum()
                moved = (xs - mu_x) / math.sqrt(max(float(var_x), eps)) * math.sqrt(max(float(var_r), eps)) + mu_r
                out[bi, ch] += xs + w * (moved - xs)
    return out / len(ref_maps)
