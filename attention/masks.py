"""Pixel masks projected onto a transformer block's token grid.

The grid always comes from the block itself (ComfyUI's ``activations_shape``), never from the image size, so
odd sizes (85x64, 43x32, ...) line up with the UNet's padded stride-2 downsampling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_RULES: tuple[str, ...] = ("parts2whole", "area")


def parts2whole_weights(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Nearest resize, 3x3 all-ones convolution (padding 1), clamp to [0, 1]; masks [R, H, W] -> [R, h*w].

    For binary masks this is a one-cell dilation at every resolution; for soft masks a clamped box sum.
    """
    m = F.interpolate(mask.unsqueeze(1).float(), size=grid, mode="nearest")
    kernel = torch.ones(1, 1, 3, 3, dtype=m.dtype, device=m.device)
    m = F.conv2d(m, kernel, padding=1).clamp(0.0, 1.0)
    return m.flatten(1)


def area_weights(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Plain area rule: each token's weight is the mean of the mask pixels it covers; [R, H, W] -> [R, h*w]."""
    m = F.adaptive_avg_pool2d(mask.unsqueeze(1).float(), grid)
    return m.clamp(0.0, 1.0).flatten(1)


def project_mask(mask: Tensor, grid: tuple[int, int], rule: str = "parts2whole") -> Tensor:
    """Token weights [R, h*w] for masks [R, H, W] on a block grid (h, w)."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be [references, height, width], got shape {tuple(mask.shape)}")
    if rule == "parts2whole":
        return parts2whole_weights(mask, grid)
    if rule == "area":
        return area_weights(mask, grid)
    raise ValueError(f"unknown mask rule {rule!r}; expected one of {MASK_RULES}")


def region_allowed(regions: Tensor, grid: tuple[int, int]) -> Tensor:
    """Per-reference region masks [R, H, W] -> allowed [h*w, R] bool on a block grid.

    A token may attend to reference r when any pixel of r's region falls in it (area coverage > 0): a region
    never vanishes at the coarse blocks, at the price of at most one token of spill at its border.
    """
    if regions.ndim != 3:
        raise ValueError(f"region masks must be [references, height, width], got shape {tuple(regions.shape)}")
    return (area_weights(regions, grid) > 0).transpose(0, 1).contiguous()
