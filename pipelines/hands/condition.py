"""Hand crops and the 11-channel hand condition of "Giving a Hand to Diffusion Models" (paper III-B, IV-A).

A crop is an integer-aligned square of the canvas (so the inverse transform is exact up to resampling),
taken around one hand or, when the two hands' squares intersect, around both (as the paper's training crops),
and resized to ``size`` (512). The condition, in crop pixels, channel by channel:

====  =========================================================
 0-4  left hand: thumb, index, middle, ring, pinky heatmaps
 5-9  right hand: thumb, index, middle, ring, pinky heatmaps
 10   hand mask (zeros when no mask is given)
====  =========================================================

"left" / "right" are the person's own hands (OpenPose's ``hand_left`` / ``hand_right``). Each finger channel
is the max of Gaussians (peak 1, sigma ``size / 64`` = 8 px at 512 by default) at the finger's four joints and
the wrist (see :func:`finger_heatmaps`). Missing joints are left out; a missing hand (or a hand that lies in
another crop) leaves its five channels zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..images import resize_square
from .draw import default_line_width, draw_hand, finger_heatmaps, keypoint_hand_mask
from .keypoints import HANDS, Person, valid

CONDITION_CHANNELS = 11
DEFAULT_SIZE = 512
DEFAULT_CROP_SCALE = 1.5  # crop side = 1.5 x the longest side of the hand's keypoint box
MIN_CROP_SIDE = 16


@dataclass(frozen=True)
class HandCrop:
    """A square [x0, x0 + side) x [y0, y0 + side) of the canvas, resized to size x size."""

    x0: int
    y0: int
    side: int
    size: int
    hands: tuple[str, ...]  # which of "left", "right" this crop was made for

    @property
    def scale(self) -> float:
        return self.size / self.side

    def to_crop(self, points: Tensor) -> Tensor:
        """[N, 3] canvas pixels -> crop pixels (confidence kept)."""
        out = points.clone()
        out[:, 0] = (points[:, 0] - self.x0) * self.scale
        out[:, 1] = (points[:, 1] - self.y0) * self.scale
        return out

    def to_canvas(self, points: Tensor) -> Tensor:
        out = points.clone()
        out[:, 0] = points[:, 0] / self.scale + self.x0
        out[:, 1] = points[:, 1] / self.scale + self.y0
        return out


def _box(points: Tensor) -> tuple[float, float, float, float]:
    p = points[valid(points), :2]
    lo, hi = p.min(dim=0).values, p.max(dim=0).values
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _square(box: tuple[float, float, float, float], crop_scale: float) -> tuple[int, int, int]:
    x0, y0, x1, y1 = box
    side = max(MIN_CROP_SIDE, int(round(max(x1 - x0, y1 - y0) * crop_scale)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return int(round(cx - side / 2)), int(round(cy - side / 2)), side


def _intersect(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def plan_crops(person: Person, size: int = DEFAULT_SIZE,
               crop_scale: float = DEFAULT_CROP_SCALE) -> tuple[HandCrop, ...]:
    """One crop for both hands when their squares intersect, else one per hand (left first)."""
    if size < 64 or size % 8:
        raise ValueError(f"crop size must be a multiple of 8 and at least 64, got {size}")
    if crop_scale < 1.0:
        raise ValueError(f"crop_scale must be at least 1.0 (the crop holds the whole hand), got {crop_scale}")
    present = [s for s in HANDS if person.hand(s) is not None]
    if not present:
        raise ValueError("no hands in the pose: nothing to crop")
    squares = {s: _square(_box(person.hand(s)), crop_scale) for s in present}
    if len(present) == 2 and _intersect(squares["left"], squares["right"]):
        both = torch.cat([person.left_hand, person.right_hand])
        x0, y0, side = _square(_box(both), crop_scale)
        return (HandCrop(x0, y0, side, size, ("left", "right")),)
    return tuple(HandCrop(*squares[s], size, (s,)) for s in present)


def crop_image(image: Tensor, crop: HandCrop) -> Tensor:
    """[H, W, C] canvas -> [size, size, C]: the square (zero-padded beyond the border), antialiased resize."""
    h, w, c = image.shape
    out = torch.zeros(crop.side, crop.side, c, dtype=image.dtype)
    ys, xs = max(crop.y0, 0), max(crop.x0, 0)
    ye, xe = min(crop.y0 + crop.side, h), min(crop.x0 + crop.side, w)
    if ye > ys and xe > xs:
        out[ys - crop.y0:ye - crop.y0, xs - crop.x0:xe - crop.x0] = image[ys:ye, xs:xe]
    return _resize(out, crop.size)


def _resize(image: Tensor, size: int) -> Tensor:
    """[S, S, C] in 0..1 -> [size, size, C]: bilinear, antialiased when shrinking."""
    return resize_square(image[None], size, "bilinear", antialias=size < image.shape[0])[0]


def paste(canvas: Tensor, patch: Tensor, alpha: Tensor, crop: HandCrop) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`crop_image`: patch [size, size, C] and alpha [size, size] placed on the canvas.

    Returns (patch, alpha) resampled to the canvas ([H, W, C], [H, W]; alpha 0 outside the crop, the parts of
    the crop beyond the canvas clipped).
    """
    h, w = canvas.shape[:2]
    p = _resize(patch, crop.side)
    a = _resize(alpha.unsqueeze(-1), crop.side)[..., 0].clamp(0.0, 1.0)
    out_p = torch.zeros(h, w, patch.shape[-1], dtype=canvas.dtype)
    out_a = torch.zeros(h, w, dtype=canvas.dtype)
    ys, xs = max(crop.y0, 0), max(crop.x0, 0)
    ye, xe = min(crop.y0 + crop.side, h), min(crop.x0 + crop.side, w)
    if ye > ys and xe > xs:
        out_p[ys:ye, xs:xe] = p[ys - crop.y0:ye - crop.y0, xs - crop.x0:xe - crop.x0].to(canvas.dtype)
        out_a[ys:ye, xs:xe] = a[ys - crop.y0:ye - crop.y0, xs - crop.x0:xe - crop.x0].to(canvas.dtype)
    return out_p, out_a


def crop_hands(person: Person, crop: HandCrop) -> dict[str, Optional[Tensor]]:
    """The hands this crop was made for, in crop pixels."""
    return {s: crop.to_crop(person.hand(s)) if s in crop.hands and person.hand(s) is not None else None
            for s in HANDS}


def hand_condition(person: Person, crop: HandCrop, sigma: Optional[float] = None,
                   mask: Optional[Tensor] = None) -> Tensor:
    """[11, size, size] float32 condition (channel table in the module docstring); mask is [size, size]."""
    sigma = crop.size / 64.0 if sigma is None else sigma
    if sigma <= 0:
        raise ValueError(f"heatmap sigma must be positive, got {sigma}")
    hands = crop_hands(person, crop)
    maps = [finger_heatmaps(hands[s], crop.size, sigma) for s in HANDS]
    m = torch.zeros(1, crop.size, crop.size, dtype=torch.float64) if mask is None else mask.double().unsqueeze(0)
    if m.shape[-2:] != (crop.size, crop.size):
        raise ValueError(f"hand mask for the condition must be {crop.size}x{crop.size}, got {tuple(m.shape[-2:])}")
    return torch.cat(maps + [m.clamp(0.0, 1.0)]).float()


def hand_skeleton(person: Person, crop: HandCrop) -> Tensor:
    """[size, size, 3]: the hands-only OpenPose drawing of this crop's hands on black."""
    canvas = torch.zeros(crop.size, crop.size, 3, dtype=torch.float32)
    line, radius = default_line_width(crop.size)
    for pts in crop_hands(person, crop).values():
        draw_hand(canvas, pts, line, radius)
    return canvas


def keypoint_mask(person: Person, crop: HandCrop, dilation: float = 8.0, finger_width: float = 0.07) -> Tensor:
    """[size, size] training-free hand mask of this crop's hands (capsules + palm, dilated, in crop pixels)."""
    out = torch.zeros(crop.size, crop.size)
    for pts in crop_hands(person, crop).values():
        if pts is not None:
            out = torch.maximum(out, keypoint_hand_mask(pts, crop.size, crop.size, finger_width, dilation).float())
    return out


def downscale_condition(condition: Tensor, height: int, width: int) -> Tensor:
    """[B, 11, H, W] -> [B, 11, h, w]: bilinear (paper III-B), antialiased so thin heatmaps are not skipped."""
    return F.interpolate(condition.float(), size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True)
