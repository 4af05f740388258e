"""AdaIN references (A1111's and ComfyUI-Advanced-ControlNet's ``reference_adain``).

At the output of chosen UNet blocks, the target's feature statistics (mean and standard deviation per channel
over the spatial dimensions, per batch row) are moved to a reference's: AdaIN(x) = (x - mu_x) / sigma_x *
sigma_ref + mu_ref, with the variance clamped at 1e-6 before the square root, as the anchors do. Each
reference r blends with weight w_r (x + w_r (AdaIN_r(x) - x), the anchors' per-reference strength) and several
references are averaged. A reference's statistics are taken over its mask when it has one (weights on that
block's grid), over the whole feature map otherwise.

Which blocks: the anchors' set at their default weight 1.0, from their per-block gates (input blocks
[4, 5, 7, 8, 10, 11] gated 2 (1 - w / 6), the middle block 0, output blocks [0..7] gated 2 w / 8; a block
acts when the gate is below the weight): SD1.5 input 10, 11, middle, output 0-3; SDXL input 8, middle,
output 0-2 (its lists are [4, 5, 7, 8] and [0..5]). That is, the deepest blocks: the last 2 (SDXL: 1) input
blocks, the middle, the first 4 (SDXL: 3) output blocks, which is how a UNet of other depth is served, except
that input block 0 (``conv_in``, a linear map of the latent itself) is never one, as in the anchors' lists: on a
shallow UNet "the last 2 input blocks" would otherwise include it, and AdaIN there replaces the noisy latent's
statistics by the reference's before the UNet has seen it (a UNet with 2 input blocks then lost its layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .blocks import CUSTOM_ENTRY, custom_entries
from .gating import COND, chunk_slices

EPS = 1e-6  # the anchors' variance floor

# (kind, index) of a UNet block, as ComfyUI's transformer_options["block"] names it
UNetBlock = tuple[str, int]
# the anchors' default set per model family: (last input blocks, first output blocks) around the middle
ADAIN_DEPTH: dict[str, tuple[int, int]] = {"SD15": (2, 4), "SDXL": (1, 3)}


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Per-channel mean and (population) variance of one reference's block output, [C] each, float32."""

    mean: Tensor
    var: Tensor


def feature_stats(x: Tensor, weights: Optional[Tensor] = None) -> Optional[FeatureStats]:
    """Statistics of a feature map [C, H, W]; ``weights`` (a mask on this grid, [H, W] or [H * W]) weight each
    position. None when the weights select nothing on this grid."""
    flat = x.float().flatten(1)  # [C, HW]
    if weights is None:
        var, mean = torch.var_mean(flat, dim=1, correction=0)
        return FeatureStats(mean, var)
    w = weights.float().flatten().to(flat.device)
    total = w.sum()
    if float(total) <= 0:
        return None
    mean = (flat * w).sum(dim=1) / total
    var = (((flat - mean[:, None]) ** 2) * w).sum(dim=1) / total
    return FeatureStats(mean, var)


def adain(x: Tensor, refs: Sequence[FeatureStats], weights: Sequence[float]) -> Tensor:
    """x [B, C, H, W] with its statistics moved toward each reference's by its weight, averaged over references."""
    if len(refs) != len(weights) or not refs:
        raise ValueError(f"{len(refs)} reference statistics for {len(weights)} weights")
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True, correction=0)
    normalized = (xf - mean) / var.clamp(min=EPS).sqrt()
    out = torch.zeros_like(xf)
    for stats, w in zip(refs, weights):
        mu = stats.mean.to(xf.device).reshape(1, -1, 1, 1)
        sigma = stats.var.to(xf.device).clamp(min=EPS).sqrt().reshape(1, -1, 1, 1)
        out += xf + w * (normalized * sigma + mu - xf)
    return (out / len(refs)).to(x.dtype)


def default_adain_blocks(family: str, inputs: int, outputs: int) -> tuple[UNetBlock, ...]:
    """The anchors' set for a UNet of ``inputs`` input and ``outputs`` output blocks (input block 0, conv_in, is
    never one; the last output block has no patch point after it, so it is never one either)."""
    if family not in ADAIN_DEPTH:
        raise ValueError(f"AdaIN knows the block set of SD15 and SDXL models, not {family or 'this model'}: choose "
                         "blocks 'custom' and list the blocks, e.g. 'middle_0, output_0, output_1'")
    last_inputs, first_outputs = ADAIN_DEPTH[family]
    return (tuple(("input", i) for i in range(max(1, inputs - last_inputs), inputs)) + (("middle", 0),)
            + tuple(("output", i) for i in range(min(first_outputs, outputs - 1))))


def adain_blocks(family: str, block_set: str, inputs: int, outputs: int,
                 custom: tuple[UNetBlock, ...] = ()) -> tuple[UNetBlock, ...]:
    """The UNet blocks an AdaIN patch acts on: the anchors' set, narrowed by the patch's block set ("mid+up":
    middle and output, "down-only": input), or exactly ``custom`` for "custom"."""
    if block_set == "custom":
        return tuple(custom)
    kinds = {"all": ("input", "middle", "output"), "mid+up": ("middle", "output"), "down-only": ("input",)}
    if block_set not in kinds:
        raise ValueError(f"unknown block set {block_set!r}")
    return tuple(b for b in default_adain_blocks(family, inputs, outputs) if b[0] in kinds[block_set])


def unet_blocks_named(custom: str) -> tuple[UNetBlock, ...]:
    """UNet blocks named in a custom_blocks text ('input_10, middle_0, output_2'; a '.index' is ignored)."""
    found: list[UNetBlock] = []
    for item in custom_entries(custom):
        m = CUSTOM_ENTRY.match(item)
        if not m:
            raise ValueError(f"custom_blocks entry {item!r} is not like 'input_4', 'middle_0' or 'output_9'")
        block = (m.group(1), int(m.group(2)))
        if block not in found:
            found.append(block)
    return tuple(found)


def adain_chunks(x: Tensor, cond_or_uncond: Optional[Sequence[int]], refs: Sequence[FeatureStats],
                 weights: Sequence[float], style_fidelity: float) -> Tensor:
    """AdaIN on the cond rows; the uncond rows get fidelity * x + (1 - fidelity) * AdaIN(x) (the anchors'
    style fidelity: 1 leaves them untouched)."""
    moved = adain(x, refs, weights)
    if style_fidelity <= 0.0:
        return moved
    out = moved.clone()
    for sl, kind in chunk_slices(cond_or_uncond, x.shape[0]):
        if kind != COND:
            out[sl] = style_fidelity * x[sl] + (1.0 - style_fidelity) * moved[sl]
    return out
