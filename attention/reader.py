"""The reader side: one attn1 call with every active reference layer, gated per CFG chunk.

Several layers can meet in one block (two chained patches, two banks): concat and strict references join one
key set; a blend layer mixes that joint attention, with its own references added, against it by its ratio;
dual layers add their own separate term (optionally confined per reference to a region of the target). Chunks whose layers are all off run plain attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .gating import COND, chunk_slices
from .kernels import AttnFn, ProjectedReferences, blend_attention, joint_attention, region_dual_term

MODES: tuple[str, ...] = ("concat", "strict", "blend", "dual")
# concat and blend keep the official "zeroed tokens still take softmax mass" semantics.
DILUTING_MODES = frozenset({"concat", "blend"})


@dataclass(frozen=True, eq=False)
class ActiveLayer:
    mode: str
    refs: ProjectedReferences
    weight: float = 1.0  # blend ratio or dual lambda; concat/strict carry strength in refs.bias
    uncond: bool = False  # the uncond chunk sees these references too
    allowed: Optional[Tensor] = None  # dual only: [tokens, references] bool, which references a query may see


def compose(q: Tensor, k: Tensor, v: Tensor, heads: int, layers: Sequence[ActiveLayer], attn_fn: AttnFn) -> Tensor:
    """Attention of one group of rows under the given layers."""
    if not layers:
        return attn_fn(q, k, v, heads)
    base_refs = [layer.refs for layer in layers if layer.mode in ("concat", "strict")]
    out = joint_attention(q, k, v, heads, base_refs, attn_fn)
    for layer in layers:
        if layer.mode == "blend":
            out = blend_attention(q, k, v, heads, layer.refs, layer.weight, attn_fn, base=out, base_refs=base_refs)
    for layer in layers:
        if layer.mode == "dual":
            out = out + layer.weight * region_dual_term(q, heads, layer.refs, layer.allowed, attn_fn)
    return out


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    cond_or_uncond: Optional[Sequence[int]],
    layers: Sequence[ActiveLayer],
    attn_fn: AttnFn,
) -> Tensor:
    """attn1 output [B, N, C] with references gated per chunk (uncond rows see only layers with uncond=True)."""
    for layer in layers:
        if layer.mode not in MODES:
            raise ValueError(f"unknown injection mode {layer.mode!r}; expected one of {MODES}")
        if layer.allowed is not None and layer.mode != "dual":
            raise ValueError(f"region masks apply to the dual mode only, not to {layer.mode!r}")
    if not layers:
        return attn_fn(q, k, v, heads)
    slices = chunk_slices(cond_or_uncond, q.shape[0])
    groups: list[tuple[slice, tuple[ActiveLayer, ...]]] = []
    for sl, kind in slices:
        active = tuple(layer for layer in layers if kind == COND or layer.uncond)
        if groups and groups[-1][1] == active and groups[-1][0].stop == sl.start:
            groups[-1] = (slice(groups[-1][0].start, sl.stop), active)
        else:
            groups.append((sl, active))
    if len(groups) == 1:
        return compose(q, k, v, heads, groups[0][1], attn_fn)
    return torch.cat([compose(q[sl], k[sl], v[sl], heads, active, attn_fn) for sl, active in groups], dim=0)
