"""Attention maps: where in the target each reference's attention mass goes.

For every target query token, a reference's *share* is the part of the query's softmax mass that lands on that
reference's keys, averaged over heads, in the softmax where the reference takes part: the joint one over the
target's own keys and every mass-strength reference (concat, strict, adain+attn), the joint one with a blend
patch's references added (blend), or the separate term over a dual patch's references (where a region mask
shuts a reference out, its share is 0). The single zero key that stands in for masked-out reference tokens
belongs to no reference. A :class:`AttentionRecord` sums the shares of the cond rows over the chosen blocks and
steps of one sampling run onto the finest grid it saw; the host calls it from its attn1 replace, so nothing is
computed when no record is attached.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .blocks import BlockKey
from .kernels import ProjectedReferences
from .reader import ActivePatch, Strength

CHUNK_ELEMENTS = 1 << 24  # logits per query chunk (batch x heads x queries x keys): 64 MiB in float32


def _owners(refs: ProjectedReferences) -> Tensor:
    """Reference index of each key, -1 for the zero key (and for every key when segments are unknown)."""
    tail = refs.length - sum(refs.segments)
    if tail < 0:
        raise ValueError(f"reference segments {refs.segments} exceed the {refs.length} reference keys")
    ids = torch.arange(-1, len(refs.segments)).roll(-1)  # 0, 1, ..., n - 1, -1
    sizes = torch.tensor(list(refs.segments) + [tail])
    return torch.repeat_interleave(ids, sizes).to(refs.k.device)


def key_shares(q: Tensor, keys: Tensor, bias: Optional[Tensor], owners: Tensor, groups: int, heads: int,
               chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Softmax mass per owner group, averaged over heads: [B, Nq, groups].

    q [B, Nq, C], keys [B, Nk, C], bias [Nk] or None (additive, per key), owners [Nk] long (-1: no group).
    Queries are processed in chunks so no more than ``chunk_elements`` logits exist at once.
    """
    b, nq, _ = q.shape
    nk = keys.shape[1]
    qh = rearrange(q, "b n (h d) -> b h n d", h=heads)
    kh = rearrange(keys, "b n (h d) -> b h n d", h=heads)
    scale = qh.shape[-1] ** -0.5
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    onehot = F.one_hot(owners.clamp(min=0), groups).to(work) * (owners >= 0).unsqueeze(1)
    onehot = onehot.to(device=q.device)
    step = max(1, chunk_elements // max(1, b * heads * nk))
    out = []
    for start in range(0, nq, step):
        logits = torch.einsum("bhnd,bhmd->bhnm", qh[:, :, start:start + step].to(work), kh.to(work)) * scale
        if bias is not None:
            logits = logits + bias.to(device=q.device, dtype=work)
        probs = logits.softmax(dim=-1)
        out.append((probs @ onehot).mean(dim=1))  # [B, n, groups]
    return torch.cat(out, dim=1)


def _joint_keys(k: Tensor, refs: Sequence[ProjectedReferences], b: int) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Keys [own, refs...], their bias (None when none has one) and owners (-1 for own keys), group per ref."""
    keys = torch.cat([k] + [r.k.to(k.dtype).expand(b, -1, -1) for r in refs], dim=1)
    owners, biases, offset = [torch.full((k.shape[1],), -1, dtype=torch.long, device=k.device)], [], 0
    for r in refs:
        o = _owners(r).to(k.device)
        owners.append(torch.where(o >= 0, o + offset, o))
        offset += len(r.segments)
    bias = None
    if any(r.bias is not None for r in refs):
        dtype = torch.float64
        biases = [torch.zeros(k.shape[1], dtype=dtype, device=k.device)]
        biases += [r.bias.to(device=k.device, dtype=dtype) if r.bias is not None
                   else torch.zeros(r.length, dtype=dtype, device=k.device) for r in refs]
        bias = torch.cat(biases)
    return keys, bias, torch.cat(owners)


@torch.no_grad()
def reference_shares(q: Tensor, k: Tensor, heads: int, patches: Sequence[ActivePatch],
                     chunk_elements: int = CHUNK_ELEMENTS) -> list[Tensor]:
    """Per patch, each reference's share of every query's attention [B, Nq, references of the patch].

    ``k`` holds the target's own keys [B, Nk, C]; each patch's ``refs.segments`` names its references (a
    reference without kept tokens at this block has a share of 0).
    """
    b = q.shape[0]
    mass = [p for p in patches if p.mode.strength_is is Strength.MASS]
    mass_refs = [p.refs for p in mass]
    shares: dict[int, Tensor] = {}
    if mass:
        keys, bias, owners = _joint_keys(k, mass_refs, b)
        joint = key_shares(q, keys, bias, owners, sum(len(r.segments) for r in mass_refs), heads, chunk_elements)
        offset = 0
        for p in mass:
            shares[id(p)] = joint[..., offset:offset + len(p.refs.segments)]
            offset += len(p.refs.segments)
    for p in patches:
        n = len(p.refs.segments)
        if p.mode.strength_is is Strength.RATIO:
            keys, bias, owners = _joint_keys(k, mass_refs + [p.refs], b)
            first = sum(len(r.segments) for r in mass_refs)
            owners = torch.where(owners >= first, owners - first, torch.full_like(owners, -1))
            shares[id(p)] = key_shares(q, keys, bias, owners, n, heads, chunk_elements)
        elif p.mode.strength_is is Strength.LAMBDA:
            keys = p.refs.k.to(q.dtype).expand(b, -1, -1)
            if p.allowed is None:
                shares[id(p)] = key_shares(q, keys, p.refs.bias, _owners(p.refs), n, heads, chunk_elements)
            else:
                shares[id(p)] = _allowed_shares(q, keys, heads, p, chunk_elements)
    return [shares[id(p)] for p in patches]


def _allowed_shares(q: Tensor, keys: Tensor, heads: int, p: ActivePatch, chunk_elements: int) -> Tensor:
    """Dual shares when each query attends only to its allowed references (the region kernel's softmax)."""
    owners = _owners(p.refs)
    allowed = p.allowed.to(device=q.device, dtype=torch.bool)
    n = len(p.refs.segments)
    out = torch.zeros(q.shape[0], q.shape[1], n, device=q.device,
                      dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    patterns, inverse = torch.unique(allowed.to(torch.uint8), dim=0, return_inverse=True)
    for i in range(patterns.shape[0]):
        pattern = patterns[i].bool()
        selected = (owners >= 0) & pattern[owners.clamp(min=0)]
        if not bool(selected.any()):
            continue
        rows = (inverse == i).nonzero().squeeze(1)
        bias = None if p.refs.bias is None else p.refs.bias[selected]
        out[:, rows] = key_shares(q[:, rows], keys[:, selected], bias, owners[selected], n, heads, chunk_elements)
    return out


@dataclass(frozen=True)
class RecordedReference:
    """One reference a record has seen: its patch (``source``) and index in the patch's bank, and its label."""

    source: Hashable
    index: int
    label: str


@dataclass(eq=False)
class AttentionRecord:
    """Shares of the cond rows summed over blocks and steps of the last sampling run.

    ``blocks``: which transformer blocks count ("all", "input", "middle", "output"); ``step``: the sampler step
    to record (0-based), or -1 for every step. Shared by model clones (deepcopy returns itself) so the node that
    reads it sees what the sampler recorded.
    """

    blocks: str = "all"
    step: int = -1
    references: list[RecordedReference] = field(default_factory=list)
    _sums: dict[tuple[int, int], Tensor] = field(default_factory=dict)  # grid -> [B, R, h, w] summed shares
    records: int = 0
    steps_seen: set[int] = field(default_factory=set)
    runs: int = 0  # sampling runs started with this record (the maps show the last)
    steps: Optional[int] = None  # the last run's step count, when the host knows it
    acted_without_attention: set[str] = field(default_factory=set)  # modes that moved statistics only (adain)

    def __deepcopy__(self, memo: dict) -> AttentionRecord:
        return self

    def start_run(self, steps: Optional[int] = None) -> None:
        self.runs += 1
        self.steps = steps
        self.references.clear()
        self._sums.clear()
        self.records = 0
        self.steps_seen.clear()
        self.acted_without_attention.clear()

    def wants(self, key: BlockKey, step: int) -> bool:
        if self.step >= 0 and step != self.step:
            return False
        return self.blocks == "all" or key[0] == self.blocks

    def add(self, grid: tuple[int, int], shares: Sequence[tuple[RecordedReference, Tensor]], step: int) -> None:
        """Shares [B, h*w] per reference at one block of one step (cond rows only)."""
        if not shares:
            return
        columns = []
        for ref, share in shares:
            if ref not in self.references:
                self.references.append(ref)
            columns.append((self.references.index(ref), share))
        b = columns[0][1].shape[0]
        maps = torch.zeros(b, len(self.references), grid[0] * grid[1], dtype=torch.float32)
        for index, share in columns:
            maps[:, index] += share.detach().float().cpu()
        maps = maps.reshape(b, len(self.references), *grid)
        old = self._sums.get(grid)
        if old is not None:
            if old.shape[0] != b:
                raise ValueError(f"the attention record saw batches of {old.shape[0]} and {b} images in one run")
            maps = maps + F.pad(old, (0, 0, 0, 0, 0, maps.shape[1] - old.shape[1]))  # references seen since
        self._sums[grid] = maps
        self.records += 1
        self.steps_seen.add(step)

    def maps(self) -> Tensor:
        """Mean share per reference over every recorded block and step, on the finest grid: [B, R, H, W]."""
        if not self._sums:
            raise ValueError("nothing was recorded")
        r = len(self.references)
        finest = max(self._sums, key=lambda g: g[0] * g[1])
        total = None
        for grid, maps in self._sums.items():
            maps = F.pad(maps, (0, 0, 0, 0, 0, r - maps.shape[1]))
            if grid != finest:
                maps = F.interpolate(maps, size=finest, mode="bilinear", align_corners=False)
            total = maps if total is None else total + maps
        return total / self.records
