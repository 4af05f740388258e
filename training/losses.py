"""AnyDressing's training-only losses (paper 4.2.2 and 4.3), on plain tensors.

- Instance-level garment localization (IGL): in every Dressing-Attention layer, garment g's attention map is
  the dual attention's probability mass on g's tokens per target token (mean over heads); it is regressed to
  g's region on the person (area-pooled to the layer's grid) with an L2 loss, averaged over layers.
- Garment-enhanced texture learning (GTL), high-frequency part: an L2 between the one-step decode of x0_hat
  and the target, weighted by the target's Canny edges (kornia, thresholds on the grey image, dilated by one
  pixel) inside the garment regions, normalised by the weight's sum. The DISTS half of GTL needs pretrained
  VGG weights that no pip package ships, so it is not part of this trainer.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def pooled_regions(regions: Tensor, grid: tuple[int, int]) -> Tensor:
    """[B, G, H, W] -> [B, G, h*w]: the share of each token's pixels inside each garment's region."""
    return F.adaptive_avg_pool2d(regions.float(), grid).flatten(2)


def localization_loss(maps: Mapping[int, tuple[Tensor, tuple[int, int]]], regions: Tensor) -> Tensor:
    """Mean over layers of mean((A_g - M_g)^2); maps: layer -> ([B, G, N] attention mass, grid (h, w))."""
    if not maps:
        raise ValueError("no Dressing-Attention maps were recorded (no garment features reached the reader)")
    losses = []
    for mass, grid in maps.values():
        target = pooled_regions(regions.to(mass.device), grid)
        if target.shape != mass.shape:
            raise ValueError(f"attention maps {tuple(mass.shape)} do not match the regions on grid {grid} "
                             f"({tuple(target.shape)})")
        losses.append(F.mse_loss(mass.float(), target))
    return torch.stack(losses).mean()


def edge_weights(target: Tensor, low: float = 0.1, high: float = 0.2) -> Tensor:
    """[B, 3, H, W] in -1..1 -> [B, 1, H, W] in {0, 1}: Canny edges of the grey image, dilated by 1 px."""
    try:
        from kornia.filters import canny
    except ImportError:  # kornia is a ComfyUI requirement; say so rather than fail deep inside
        raise ImportError("the texture loss needs kornia (installed with ComfyUI's requirements); install it or "
                          "use --texture-weight 0") from None
    grey = ((target.float() + 1.0) / 2.0).clamp(0, 1).mean(dim=1, keepdim=True)
    _, edges = canny(grey, low_threshold=low, high_threshold=high)
    return (F.max_pool2d(edges, 3, stride=1, padding=1) > 0).float()


def texture_loss(pred: Tensor, target: Tensor, regions: Tensor, low: float = 0.1, high: float = 0.2) -> Tensor:
    """Edge-weighted L2 between pred and target ([B, 3, H, W], -1..1) inside the garments' regions [B, G, H, W]."""
    weight = edge_weights(target, low, high) * regions.float().amax(dim=1, keepdim=True).to(target.device)
    err = (pred.float() - target.float()) ** 2
    return (weight * err).sum() / (3.0 * weight.sum()).clamp(min=1.0)
