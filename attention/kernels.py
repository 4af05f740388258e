"""Injection kernels, in the projected space of an attn1 replace patch.

Every tensor here is ``[batch, tokens, heads * dim_head]`` as ComfyUI hands it to an attn1 replace. The
reference part of a key/value sequence is a :class:`ProjectedReferences`: its keys and values are projected
once per sampling run and broadcast over the batch, with an optional per-key additive bias (log attention-mass
multipliers: reference strength, and the single zero key that stands in for every masked-out token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

# attn_fn(q, k, v, heads) -> out; the host passes ComfyUI's optimized_attention, tests pass sdpa.
AttnFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int, key_bias: Optional[Tensor] = None) -> Tensor:
    """Multi-head attention with an optional additive bias per key, broadcast over queries and heads.

    Used whenever a bias is needed: a key-only bias of shape [Nk] costs nothing to broadcast, where ComfyUI's
    mask path would materialise [B, Nq, Nk].
    """
    qh, kh, vh = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    mask = None if key_bias is None else key_bias.to(device=q.device, dtype=q.dtype).reshape(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return rearrange(out, "b h n d -> b n (h d)")


@dataclass(frozen=True, eq=False)
class ProjectedReferences:
    """Reference keys/values for one block, already projected: k, v [1, M, C]; bias [M] or None.

    ``segments``: how many consecutive keys each reference owns (sums to M), when a kernel needs to tell the
    references apart (per-garment region masks of the dual kernel); empty when nobody asks.
    """

    k: Tensor
    v: Tensor
    bias: Optional[Tensor] = None
    segments: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return self.k.shape[1]


@dataclass(frozen=True, eq=False)
class LinearWeights:
    """A key or value projection given as tensors (AnyDressing's trained W'_k / W'_v): y = x W^T (+ b).

    Cast to the input's device and dtype on use, so one copy serves every model dtype.
    """

    weight: Tensor  # [out, in]
    bias: Optional[Tensor] = None

    def __call__(self, x: Tensor) -> Tensor:
        w = self.weight.to(device=x.device, dtype=x.dtype)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)


def project_references(
    tokens: Tensor,
    dropped: int,
    to_k: Callable[[Tensor], Tensor],
    to_v: Callable[[Tensor], Tensor],
    strength: float = 1.0,
    dilute: bool = True,
) -> Optional[ProjectedReferences]:
    """Project kept reference tokens [M, C] (all references of a block as one) into keys/values, once per run.

    ``dilute``: keep the official Parts2Whole semantics where masked-out tokens are zero vectors that still
    take softmax mass. Instead of carrying ``dropped`` zero tokens, one zero token is appended with an additive
    bias of log(dropped): exp(q.0 + log n) = n, which is exactly the mass n zero keys take, and its value adds
    nothing (a zero token projects to the same key/value as each dropped one). ``strength`` multiplies the
    attention mass of every reference key (log bias), 1.0 being the official behaviour.
    """
    return project_parts([(tokens, dropped, 1.0)], to_k, to_v, strength, dilute)


def project_parts(
    parts: Sequence[tuple[Tensor, int, float]],
    to_k: Callable[[Tensor], Tensor],
    to_v: Callable[[Tensor], Tensor],
    strength: float = 1.0,
    dilute: bool = True,
    weight_values: bool = False,
) -> Optional[ProjectedReferences]:
    """:func:`project_references` with one weight per reference: ``parts`` = (kept tokens [m, C], dropped
    count, weight) per reference, in bank order; ``segments`` of the result = kept tokens per reference.

    A weight multiplies its reference's attention mass (a log bias on its keys; its share of the zero key's
    mass too), or, with ``weight_values``, its reference's values (the separate dual term, where a mass factor
    shared by every key would cancel). Weight 0 leaves the reference out.
    """
    if strength <= 0:
        return None
    kept = [(t, d, w) if w > 0 else (t[:0], 0, 0.0) for t, d, w in parts]
    zero_mass = sum(d * w for _, d, w in kept) if dilute else 0.0
    tokens = torch.cat([t for t, _, _ in kept], dim=0)
    if tokens.shape[0] == 0 and zero_mass <= 0:
        return None
    segments = tuple(int(t.shape[0]) for t, _, _ in kept)
    if zero_mass > 0:
        tokens = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[1])], dim=0)
    k = to_k(tokens.unsqueeze(0))
    v = to_v(tokens.unsqueeze(0))
    # one weight per key (the zero key, when there is one, last with weight 1), built per reference, not per token
    part_weights = torch.tensor([w for _, _, w in kept] + [1.0], dtype=torch.float64)
    counts = torch.tensor(list(segments) + [tokens.shape[0] - sum(segments)])
    per_key = torch.repeat_interleave(part_weights, counts)
    uneven = any(w != 1.0 for t, _, w in kept if t.shape[0])
    if weight_values and uneven:
        v = v * per_key.to(dtype=v.dtype, device=v.device).reshape(1, -1, 1)
    bias = None
    if strength != 1.0 or zero_mass > 0 or (uneven and not weight_values):
        log_mass = torch.zeros_like(per_key) if weight_values else per_key.log()
        if zero_mass > 0:
            log_mass[-1] = math.log(zero_mass)
        bias = (log_mass + math.log(strength)).to(dtype=k.dtype, device=k.device)
    return ProjectedReferences(k, v, bias, segments)


def joint_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, refs: Sequence[ProjectedReferences], attn_fn: AttnFn
) -> Tensor:
    """Q from the target, K/V = [own, refs...] (the Parts2Whole concat; strict when refs carry no zero key)."""
    if not refs:
        return attn_fn(q, k, v, heads)
    b = q.shape[0]
    keys = torch.cat([k] + [r.k.to(k.dtype).expand(b, -1, -1) for r in refs], dim=1)
    values = torch.cat([v] + [r.v.to(v.dtype).expand(b, -1, -1) for r in refs], dim=1)
    if all(r.bias is None for r in refs):
        return attn_fn(q, keys, values, heads)
    dtype = next(r.bias.dtype for r in refs if r.bias is not None)
    parts = [torch.zeros(k.shape[1], dtype=dtype, device=k.device)]
    for r in refs:
        parts.append(r.bias if r.bias is not None else torch.zeros(r.length, dtype=dtype, device=k.device))
    return sdpa(q, keys, values, heads, torch.cat(parts))


def blend_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    refs: ProjectedReferences,
    ratio: float,
    attn_fn: AttnFn,
    base: Optional[Tensor] = None,
    base_refs: Sequence[ProjectedReferences] = (),
) -> Tensor:
    """ratio * Attn(x, [x, base_refs, ref]) + (1 - ratio) * base (MimicBrush: ratio 0.5, base = Attn(x, x))."""
    if base is None:
        base = joint_attention(q, k, v, heads, base_refs, attn_fn)
    with_ref = joint_attention(q, k, v, heads, list(base_refs) + [refs], attn_fn)
    return ratio * with_ref + (1.0 - ratio) * base


def dual_term(q: Tensor, heads: int, refs: ProjectedReferences, attn_fn: AttnFn) -> Tensor:
    """Attn(Q_x, F W'_k, F W'_v): the separate garment attention of AnyDressing's Dressing-Attention."""
    b = q.shape[0]
    k = refs.k.to(q.dtype).expand(b, -1, -1)
    v = refs.v.to(q.dtype).expand(b, -1, -1)
    if refs.bias is None:
        return attn_fn(q, k, v, heads)
    return sdpa(q, k, v, heads, refs.bias)


def key_owners(refs: ProjectedReferences) -> Tensor:
    """Reference index of every key [M] (long), from ``refs.segments``."""
    if sum(refs.segments) != refs.length:
        raise ValueError(f"reference segments {refs.segments} do not add up to the {refs.length} reference keys")
    sizes = torch.tensor(refs.segments, dtype=torch.long, device=refs.k.device)
    return torch.repeat_interleave(torch.arange(len(refs.segments), device=refs.k.device), sizes)


def _subset(refs: ProjectedReferences, keys: Tensor) -> ProjectedReferences:
    bias = None if refs.bias is None else refs.bias[keys]
    return ProjectedReferences(refs.k[:, keys], refs.v[:, keys], bias)


def region_dual_term(q: Tensor, heads: int, refs: ProjectedReferences, allowed: Optional[Tensor],
                     attn_fn: AttnFn) -> Tensor:
    """The dual term where query token i may attend only to the references r with ``allowed[i, r]``.

    ``allowed`` [Nq, R] bool is the same for every batch row (per-garment region masks on the target). Queries
    are grouped by their pattern of allowed references, and each group attends to the concatenation of its
    references' keys, so no [Nq, M] mask is ever built. A query allowed no reference gets 0 (no garment there).
    """
    if allowed is None:
        return dual_term(q, heads, refs, attn_fn)
    if allowed.ndim != 2 or allowed.shape[0] != q.shape[1] or allowed.shape[1] != len(refs.segments):
        raise ValueError(f"region pattern {tuple(allowed.shape)} does not fit {q.shape[1]} queries and "
                         f"{len(refs.segments)} references")
    allowed = allowed.to(device=q.device, dtype=torch.bool)
    if bool(allowed.all()):
        return dual_term(q, heads, refs, attn_fn)
    owners = key_owners(refs)
    patterns, inverse = torch.unique(allowed.to(torch.uint8), dim=0, return_inverse=True)
    out = q.new_zeros(q.shape)
    for p in range(patterns.shape[0]):
        pattern = patterns[p].bool()
        if not bool(pattern.any()):
            continue
        keys = pattern[owners].nonzero().squeeze(1)
        if keys.numel() == 0:  # the allowed references have no kept tokens at this block
            continue
        rows = (inverse == p).nonzero().squeeze(1)
        out[:, rows] = dual_term(q[:, rows], heads, _subset(refs, keys), attn_fn)
    return out
