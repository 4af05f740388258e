"""The reader side: one attn1 call with every active reference patch, gated per CFG chunk.

Several patches can meet in one block (two chained patch nodes, two banks). What each one does is its
:class:`Mode`, one row of the table below: references with a mass strength join one key set with the target's
own keys; a ratio patch mixes that joint attention, with its own references added, against it; a lambda patch
adds its own separate term (optionally confined per reference to a region of the target). Chunks whose patches
are all off run plain attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Sequence

import torch
from torch import Tensor

from .gating import COND, chunk_slices
from .kernels import AttnFn, ProjectedReferences, blend_attention, joint_attention, region_dual_term


class Strength(Enum):
    """What a patch's strength means."""

    MASS = "multiplies the attention mass of every reference key (a log bias; 1 = official, 0 = off)"
    RATIO = "mixes attention with the references against without: ratio * with + (1 - ratio) * without"
    LAMBDA = "weights a separate attention over the references, added to the target's own"


@dataclass(frozen=True)
class Mode:
    """One injection mode; ``name`` is the patch node's combo value (saved in workflows).

    ``joins_own_keys``: the references share one softmax with the target's own keys; otherwise they get a
    separate attention term, which may use trained key/value projections and per-reference target regions.
    ``dilutes``: masked-out tokens keep their softmax mass as zero keys (the official Parts2Whole/MimicBrush
    semantics); otherwise they are left out.
    """

    name: str
    joins_own_keys: bool
    dilutes: bool
    strength_is: Strength

    @property
    def takes_regions(self) -> bool:
        return not self.joins_own_keys


CONCAT = Mode("concat", joins_own_keys=True, dilutes=True, strength_is=Strength.MASS)  # Parts2Whole
STRICT = Mode("strict", joins_own_keys=True, dilutes=False, strength_is=Strength.MASS)
BLEND = Mode("blend", joins_own_keys=True, dilutes=True, strength_is=Strength.RATIO)  # MimicBrush
DUAL = Mode("dual", joins_own_keys=False, dilutes=False, strength_is=Strength.LAMBDA)  # AnyDressing
MODES: dict[str, Mode] = {m.name: m for m in (CONCAT, STRICT, BLEND, DUAL)}


def mode_named(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; expected one of {tuple(MODES)}")
    return MODES[name]


@dataclass(frozen=True, eq=False)
class ActivePatch:
    mode: Mode
    refs: ProjectedReferences
    weight: float = 1.0  # a ratio or lambda strength; a mass strength is already in refs.bias
    uncond: bool = False  # the uncond chunk sees these references too
    allowed: Optional[Tensor] = None  # separate term only: [tokens, references] bool, which references a query sees


def compose(q: Tensor, k: Tensor, v: Tensor, heads: int, patches: Sequence[ActivePatch], attn_fn: AttnFn) -> Tensor:
    """Attention of one group of rows under the given patches."""
    if not patches:
        return attn_fn(q, k, v, heads)
    base_refs = [p.refs for p in patches if p.mode.strength_is is Strength.MASS]
    out = joint_attention(q, k, v, heads, base_refs, attn_fn)
    for p in patches:
        if p.mode.strength_is is Strength.RATIO:
            out = blend_attention(q, k, v, heads, p.refs, p.weight, attn_fn, base=out, base_refs=base_refs)
    for p in patches:
        if p.mode.strength_is is Strength.LAMBDA:
            out = out + p.weight * region_dual_term(q, heads, p.refs, p.allowed, attn_fn)
    return out


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    cond_or_uncond: Optional[Sequence[int]],
    patches: Sequence[ActivePatch],
    attn_fn: AttnFn,
) -> Tensor:
    """attn1 output [B, N, C] with references gated per chunk (uncond rows see only patches with uncond=True)."""
    for p in patches:
        if p.allowed is not None and not p.mode.takes_regions:
            raise ValueError(f"region masks apply to the dual mode only, not to {p.mode.name!r}")
    if not patches:
        return attn_fn(q, k, v, heads)
    slices = chunk_slices(cond_or_uncond, q.shape[0])
    groups: list[tuple[slice, tuple[ActivePatch, ...]]] = []
    for sl, kind in slices:
        active = tuple(p for p in patches if kind == COND or p.uncond)
        if groups and groups[-1][1] == active and groups[-1][0].stop == sl.start:
            groups[-1] = (slice(groups[-1][0].start, sl.stop), active)
        else:
            groups.append((sl, active))
    if len(groups) == 1:
        return compose(q, k, v, heads, groups[0][1], attn_fn)
    return torch.cat([compose(q[sl], k[sl], v[sl], heads, active, attn_fn) for sl, active in groups], dim=0)
