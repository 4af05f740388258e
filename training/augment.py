"""Colour augmentation of the hand generator's training crops (paper IV-A: RGB shift, brightness/contrast).

Only the photo is changed, never the condition or the mask. Each transform fires with probability ``p``,
drawing from the caller's generator, so a sample's augmentation is reproducible (and resumable).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class ColorAugment:
    rgb_shift: float = 20.0 / 255.0  # per-channel offset drawn from U(-rgb_shift, rgb_shift)
    brightness: float = 0.2  # offset drawn from U(-brightness, brightness)
    contrast: float = 0.2  # gain drawn from 1 + U(-contrast, contrast), around the image mean
    p: float = 0.5  # probability of each of the two transforms

    def __post_init__(self) -> None:
        for name in ("rgb_shift", "brightness", "contrast"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {getattr(self, name)}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augmentation probability must be within 0..1, got {self.p}")


def _uniform(generator: torch.Generator, limit: float, size: int = 1) -> Tensor:
    return (torch.rand(size, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * limit


def augment_colors(image: Tensor, aug: Optional[ColorAugment], generator: torch.Generator) -> Tensor:
    """[H, W, 3] in 0..1 -> augmented copy, clamped to 0..1.

    RGB shift: x + s_c. Brightness/contrast: (x - mean) * (1 + c) + mean + b, mean over the whole image.
    The random numbers are always drawn (fixed consumption per sample), whether a transform fires or not.
    """
    if aug is None:
        return image.clone()
    fire = torch.rand(2, generator=generator, dtype=torch.float64)
    shift = _uniform(generator, aug.rgb_shift, 3)
    b, c = _uniform(generator, aug.brightness), _uniform(generator, aug.contrast)
    x = image.double()
    if fire[0] < aug.p:
        x = x + shift.view(1, 1, 3)
    if fire[1] < aug.p:
        mean = x.mean()
        x = (x - mean) * (1.0 + c) + mean + b
    return x.clamp(0.0, 1.0).to(image.dtype)
