"""Garment training examples: the person (target), one garment image per slot, masks, caption.

Geometry: the person image and its garment regions are scaled to cover height x width and centre-cropped;
every garment is scaled to fit inside height x width (aspect kept, as the node keeps it) and centred on white.
The garment's token mask is its garment mask when one is given, else the garment's own area, so the white
padding that batching needs is left out of the dressing attention (at inference there is no padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..datasets import GarmentSample, read_caption, read_image, read_mask


@dataclass(frozen=True)
class GarmentDataConfig:
    height: int = 768
    width: int = 576

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < 16 or v % 8:
                raise ValueError(f"--{name} must be a multiple of 8 and at least 16, got {v}")


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """[C, h, w] -> [C, H, W], bilinear, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == size:
        return x.clone()
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False,
                         antialias=shrink)[0]


def cover(x: Tensor, height: int, width: int) -> Tensor:
    """[C, h, w]: scale to cover height x width, centre crop."""
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    y = _resize(x, (nh, nw))
    top, left = (nh - height) // 2, (nw - width) // 2
    return y[:, top:top + height, left:left + width]


def fit(x: Tensor, height: int, width: int, fill: float) -> tuple[Tensor, Tensor]:
    """[C, h, w]: scale to fit inside height x width, centre on ``fill``; also the area mask [H, W]."""
    h, w = x.shape[-2:]
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    out = torch.full((x.shape[0], height, width), fill, dtype=torch.float32)
    area = torch.zeros(height, width)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[:, top:top + nh, left:left + nw] = _resize(x, (nh, nw))
    area[top:top + nh, left:left + nw] = 1.0
    return out, area


class GarmentDataset(Dataset):
    def __init__(self, samples: Sequence[GarmentSample], slots: Sequence[str], config: GarmentDataConfig) -> None:
        if not samples:
            raise ValueError("the garment dataset has no usable samples")
        self.samples = list(samples)
        self.slots = tuple(slots)
        self.config = config

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        return self.example(item[1])

    def example(self, index: int) -> dict:
        h, w = self.config.height, self.config.width
        s = self.samples[index]
        person = cover(read_image(s.person).permute(2, 0, 1), h, w).clamp(0.0, 1.0)
        regions = torch.stack([cover(read_mask(p).unsqueeze(0), h, w)[0] for p in s.regions]).clamp(0.0, 1.0)
        garments, token_masks = [], []
        for path, gmask in zip(s.garments, s.garment_masks):
            g, area = fit(read_image(path).permute(2, 0, 1), h, w, 1.0)
            if gmask is not None:
                area, _ = fit(read_mask(gmask).unsqueeze(0), h, w, 0.0)
                area = area[0]
            garments.append(g.clamp(0.0, 1.0))
            token_masks.append(area.clamp(0.0, 1.0))
        return {
            "person": person * 2.0 - 1.0,  # [3, H, W]
            "garments": torch.stack(garments) * 2.0 - 1.0,  # [G, 3, H, W]
            "garment_masks": torch.stack(token_masks),  # [G, H, W]: which garment pixels the writer keeps
            "regions": regions,  # [G, H, W]: where each garment is on the person
            "caption": read_caption(s.caption),
            "name": s.name,
        }
