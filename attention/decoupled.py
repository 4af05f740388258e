"""Parts2Whole's decoupled image cross-attention: a side channel of attn2 over CLIP image tokens.

Every cross-attention layer adds ``scale * Attn(Q, W_k_dc T, W_v_dc T)`` to its text attention (before
``to_out``), where T are exactly ``MAX_IMAGE_TOKENS`` CLIP image embeddings, one per reference, zero padded.
Zero tokens get key 0 and value 0: they still take softmax mass, so they are kept for exactness. The uncond
pass of the official pipeline has all tokens zero, which makes its image term exactly 0, so uncond chunks are
skipped. Pure torch; the host passes its attention function.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .gating import COND, chunk_slices
from .kernels import AttnFn

MAX_IMAGE_TOKENS = 6


def pad_image_tokens(embeds: Tensor, length: int = MAX_IMAGE_TOKENS) -> Tensor:
    """[R, D] image embeddings -> [length, D], zero padded after the references (official order)."""
    if embeds.ndim != 2:
        raise ValueError(f"image embeddings must be [references, dim], got shape {tuple(embeds.shape)}")
    if embeds.shape[0] > length:
        raise ValueError(f"{embeds.shape[0]} image tokens given; the decoupled cross-attention takes at most "
                         f"{length} (one per reference)")
    pad = embeds.new_zeros(length - embeds.shape[0], embeds.shape[1])
    return torch.cat([embeds, pad], dim=0)


class DecoupledTokens:
    """Projected image keys/values [T, C] of one block, with per device/dtype copies made once."""

    def __init__(self, keys: Tensor, values: Tensor, scale: float = 1.0) -> None:
        if keys.shape != values.shape or keys.ndim != 2:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be [tokens, dim]")
        self.keys = keys
        self.values = values
        self.scale = float(scale)
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def __deepcopy__(self, memo: dict) -> DecoupledTokens:
        return self

    def on(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = (self.keys.to(device=like.device, dtype=like.dtype),
                                self.values.to(device=like.device, dtype=like.dtype))
        return self._cache[key]


def project_image_tokens(tokens: Tensor, to_k_dc: Tensor, to_v_dc: Tensor, scale: float = 1.0) -> DecoupledTokens:
    """Bias-free projections (weights [C, D]) of the padded tokens [T, D], computed once in float32."""
    if tokens.shape[-1] != to_k_dc.shape[1] or to_k_dc.shape != to_v_dc.shape:
        raise ValueError(f"image tokens have dim {tokens.shape[-1]} but the decoupled weights are "
                         f"{tuple(to_k_dc.shape)} / {tuple(to_v_dc.shape)} ([hidden, image dim] expected)")
    t = tokens.float()
    return DecoupledTokens(t @ to_k_dc.float().t(), t @ to_v_dc.float().t(), scale)


def decoupled_cross_attention(
    q: Tensor,
    text_out: Tensor,
    image: DecoupledTokens,
    heads: int,
    cond_or_uncond: Optional[Sequence[int]],
    attention: AttnFn,
) -> Tensor:
    """text_out + scale * Attn(q, K_img, V_img) for the cond chunks of the batch; q, text_out [B, N, C]."""
    cond_rows = [rows for rows, kind in chunk_slices(cond_or_uncond, q.shape[0]) if kind == COND]
    if image.scale == 0 or not cond_rows:
        return text_out
    keys, values = image.on(q)
    out = text_out.clone()
    for rows in cond_rows:  # uncond: all image tokens are zero, the term is exactly 0
        n = rows.stop - rows.start
        k = keys.unsqueeze(0).expand(n, -1, -1)
        v = values.unsqueeze(0).expand(n, -1, -1)
        out[rows] = out[rows] + image.scale * attention(q[rows], k, v, heads)
    return out
