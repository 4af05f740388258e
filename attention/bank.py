"""The reference bank: what a writer UNet saw of each reference, per transformer block.

Immutable once built and shared by reference: ComfyUI deep-copies ``model_options`` on every clone, so the
bank answers deepcopy with itself. Each block entry holds only the kept tokens of a reference (already
multiplied by their mask weight) and the count of masked-out tokens, which the kernels turn into one zero key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .adain import FeatureStats, UNetBlock
from .blocks import BlockKey
from .kernels import LinearWeights
from .labels import Labeled
from .masks import project_mask

MAX_REFERENCES = 6


class Timing(Labeled):
    """When the writer runs: at every sampling step (on latents at that sigma), or once on the clean latents."""

    EVERY_STEP = "every step"
    ONCE = "once at t=0"


TIMINGS: tuple[str, ...] = Timing.labels()


@dataclass(frozen=True, eq=False)
class CapturedTokens:
    """Kept tokens [M, C] (features times mask weight) and how many masked-out tokens were dropped."""

    tokens: Tensor
    dropped: int

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size()


def select_tokens(features: Tensor, weights: Optional[Tensor]) -> CapturedTokens:
    """Drop tokens of weight 0 from features [N, C]; scale the rest by their weight (official masking)."""
    if weights is None:
        return CapturedTokens(features, 0)
    weights = weights.to(device=features.device)
    keep = weights > 0
    kept = features[keep] * weights[keep].to(features.dtype).unsqueeze(-1)
    return CapturedTokens(kept, int(features.shape[0] - kept.shape[0]))


def merge_captured(entries: Sequence[CapturedTokens]) -> CapturedTokens:
    """All references of one block as one token sequence; dropped counts add up (all zero keys are equal)."""
    if len(entries) == 1:
        return entries[0]
    return CapturedTokens(torch.cat([e.tokens for e in entries], dim=0), sum(e.dropped for e in entries))


class MaskProjector:
    """Token weights of each reference's pixel mask, per block grid, computed once per grid size."""

    def __init__(self, masks: Sequence[Optional[Tensor]], rule: str) -> None:
        self.masks = list(masks)
        self.rule = rule
        self._cache: dict[tuple[int, tuple[int, int]], Tensor] = {}

    def weights(self, ref_index: int, grid: tuple[int, int]) -> Optional[Tensor]:
        mask = self.masks[ref_index]
        if mask is None:
            return None
        key = (ref_index, grid)
        if key not in self._cache:
            self._cache[key] = project_mask(mask.unsqueeze(0), grid, self.rule)[0]
        return self._cache[key]


@dataclass(frozen=True)
class ReferenceInfo:
    label: str
    slot: int
    size: tuple[int, int]  # pixel height, width as encoded
    masked: bool


@dataclass(frozen=True, eq=False)
class ReferenceBank:
    """References seen by a writer. ``features`` holds captured tokens per block per reference when the
    writer ran once at t = 0; with ``every step`` it is None and ``writer`` carries what the host needs to
    run the writer at each step (opaque here). ``projections`` carries a garment bank's trained dual-mode
    key/value projections to every reader of the bank."""

    references: tuple[ReferenceInfo, ...]
    block_channels: Mapping[BlockKey, int]
    timing: Timing
    mask_rule: str
    features: Optional[Mapping[BlockKey, tuple[CapturedTokens, ...]]] = None
    writer: Any = field(default=None, repr=False)
    family: str = ""  # the writer's model family as the host names it (e.g. "SD15", "SDXL")
    # trained key/value projections (W'_k, W'_v) per block for the dual mode (AnyDressing); None = the
    # reader's own to_k/to_v (training-free)
    projections: Optional[Mapping[BlockKey, tuple[LinearWeights, LinearWeights]]] = field(default=None, repr=False)
    # default target regions for the dual mode, [R, H, W] in 0..1, one per reference (all ones = anywhere)
    regions: Optional[Tensor] = field(default=None, repr=False)
    # AdaIN: each UNet block output's statistics per reference (None where its mask selects nothing there),
    # for every block the writer passed; None for ``every step`` banks (taken at each step instead)
    stats: Optional[Mapping[UNetBlock, tuple[Optional[FeatureStats], ...]]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.timing not in TIMINGS:
            raise ValueError(f"unknown writer timing {self.timing!r}; expected one of {TIMINGS}")
        object.__setattr__(self, "timing", Timing(self.timing))
        if not self.references:
            raise ValueError("a reference bank needs at least one reference")

    def __deepcopy__(self, memo: dict) -> ReferenceBank:
        return self

    @property
    def cached(self) -> bool:
        return self.features is not None

    def merged(self, key: BlockKey) -> Optional[CapturedTokens]:
        if self.features is None or key not in self.features:
            return None
        return merge_captured(self.features[key])

    def nbytes(self) -> int:
        if self.features is None:
            return 0
        return sum(e.nbytes for entries in self.features.values() for e in entries)
