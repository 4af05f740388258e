"""The reader side: one attn1 call with every active reference patch, gated per CFG chunk.

Several patches can meet in one block (two chained patch nodes, two banks). What each one does is its
:class:`Mode`, one row of the table below: references with a mass strength join one key set with the target's
own keys; a ratio patch mixes that joint attention, with its own references added, against it; a lambda patch
adds its own separate term (optionally confined per reference to a region of the target). Chunks whose patches
are all off run plain attention. AdaIN modes also move block statistics (``adain.py``; the host applies them).

Style fidelity (A1111's and ComfyUI-Advanced-ControlNet's ``style_fidelity``): the cond chunk always sees the
references; the uncond chunk gets fidelity * Attn(x, x) + (1 - fidelity) * Attn(x, [x, refs]), so 1 keeps the
references out of the uncond chunk (the official Parts2Whole and MimicBrush behaviour) and 0 shows them to both
chunks. Several patches: the uncond chunk sees the patches whose fidelity is below 1, mixed by their mean
fidelity (the anchors average the fidelities of their references).
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
    ``attends``: the references enter self-attention; ``adain``: the block statistics move to the references'.
    """

    name: str
    joins_own_keys: bool
    dilutes: bool
    strength_is: Strength
    attends: bool = True
    adain: bool = False

    @property
    def takes_regions(self) -> bool:
        return not self.joins_own_keys


CONCAT = Mode("concat", joins_own_keys=True, dilutes=True, strength_is=Strength.MASS)  # Parts2Whole
STRICT = Mode("strict", joins_own_keys=True, dilutes=False, strength_is=Strength.MASS)
BLEND = Mode("blend", joins_own_keys=True, dilutes=True, strength_is=Strength.RATIO)  # MimicBrush
DUAL = Mode("dual", joins_own_keys=False, dilutes=False, strength_is=Strength.LAMBDA)  # AnyDressing
# A1111 / ComfyUI-Advanced-ControlNet reference_adain and reference_adain+attn (their attention is concat's)
ADAIN = Mode("adain", joins_own_keys=True, dilutes=True, strength_is=Strength.MASS, attends=False, adain=True)
ADAIN_ATTN = Mode("adain+attn", joins_own_keys=True, dilutes=True, strength_is=Strength.MASS, adain=True)
MODES: dict[str, Mode] = {m.name: m for m in (CONCAT, STRICT, BLEND, DUAL, ADAIN, ADAIN_ATTN)}


def mode_named(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; expected one of {tuple(MODES)}")
    return MODES[name]


@dataclass(frozen=True, eq=False)
class ActivePatch:
    mode: Mode
    refs: ProjectedReferences
    weight: float = 1.0  # a ratio or lambda strength; a mass strength is already in refs.bias
    style_fidelity: float = 1.0  # 1: the uncond chunk does not see these references; 0: it sees them fully
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
    """attn1 output [B, N, C] with references gated per chunk by each patch's style fidelity."""
    for p in patches:
        if p.allowed is not None and not p.mode.takes_regions:
            raise ValueError(f"region masks apply to the dual mode only, not to {p.mode.name!r}")
    if not patches:
        return attn_fn(q, k, v, heads)
    seen = tuple(p for p in patches if p.style_fidelity < 1.0)
    fidelity = sum(p.style_fidelity for p in seen) / len(seen) if seen else 1.0
    if not seen:
        uncond_rule = "plain"
    elif len(seen) == len(patches) and fidelity == 0.0:
        uncond_rule = "all"
    else:
        uncond_rule = "mixed"

    def rows(sl: slice, rule: str) -> Tensor:
        if rule == "all":
            return compose(q[sl], k[sl], v[sl], heads, patches, attn_fn)
        plain = attn_fn(q[sl], k[sl], v[sl], heads)
        if rule == "plain":
            return plain
        return fidelity * plain + (1.0 - fidelity) * compose(q[sl], k[sl], v[sl], heads, seen, attn_fn)

    groups: list[tuple[slice, str]] = []
    for sl, kind in chunk_slices(cond_or_uncond, q.shape[0]):
        rule = "all" if kind == COND else uncond_rule
        if groups and groups[-1][1] == rule and groups[-1][0].stop == sl.start:
            groups[-1] = (slice(groups[-1][0].start, sl.stop), rule)
        else:
            groups.append((sl, rule))
    if len(groups) == 1:
        return rows(groups[0][0], groups[0][1])
    return torch.cat([rows(sl, rule) for sl, rule in groups], dim=0)
