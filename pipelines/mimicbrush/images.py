"""MimicBrush's geometry as the official demo does it, in ComfyUI layouts (IMAGE [B,H,W,C] 0..1, MASK [B,H,W]).

Pure torch: pad to a centred square (image white, mask black), black fill of the masked region, the paste
back (un-pad, resize, blend through the mask blurred ten times with a 3x3 Gaussian), and the crop around the
mask that keeps large images at their resolution outside the edit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..images import resize_square

BLUR_PASSES = 10
# OpenCV's GaussianBlur with ksize 3 and sigma 0 uses the fixed kernel [1, 2, 1] / 4 (BORDER_REFLECT_101)
BLUR_KERNEL = (0.25, 0.5, 0.25)


@dataclass(frozen=True)
class Box:
    """A pixel box (top, left, bottom, right), bottom/right exclusive."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left


def square_offsets(height: int, width: int) -> tuple[int, int, int]:
    """(side, top, left) of content centred in a square as the official pad_img_to_square does ((long-short)//2)."""
    side = max(height, width)
    pad = (side - min(height, width)) // 2
    return (side, pad, 0) if width > height else (side, 0, pad) if height > width else (side, 0, 0)


def pad_to_square(x: Tensor, fill: float) -> Tensor:
    """[B, H, W, C] or [B, H, W] -> square, content centred, the rest ``fill``."""
    h, w = x.shape[1], x.shape[2]
    side, top, left = square_offsets(h, w)
    if side == h == w:
        return x
    out = torch.full((x.shape[0], side, side) + tuple(x.shape[3:]), fill, dtype=x.dtype, device=x.device)
    out[:, top:top + h, left:left + w] = x
    return out


def black_fill(image: Tensor, mask: Tensor) -> Tensor:
    """The official collage_region: pixels where the binary mask is 1 become black."""
    return image * (1.0 - mask.unsqueeze(-1).to(image.dtype))


def binarize(mask: Tensor, threshold: float = 0.5) -> Tensor:
    return (mask >= threshold).to(torch.float32)


def resize_mask_binary(mask: Tensor, size: int) -> Tensor:
    """[B, S, S] binary -> [B, size, size] binary (resample, then threshold at 0.5 as the official processor)."""
    if mask.shape[-1] == size and mask.shape[-2] == size:
        return binarize(mask)
    m = F.interpolate(mask.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)
    return binarize(m.squeeze(1))


def blur_mask(mask: Tensor, passes: int = BLUR_PASSES) -> Tensor:
    """[B, H, W] in 0..1 -> the official alpha: ``passes`` 3x3 Gaussian blurs on an 8-bit image.

    Each pass is separable [1, 2, 1] / 4 with reflect-101 borders, rounded (halves up) to 1/255 as
    OpenCV's bit-exact 8-bit path does.
    """
    k = torch.tensor(BLUR_KERNEL, dtype=torch.float32)
    x = (mask.float() * 255.0).round().unsqueeze(1)
    for _ in range(passes):
        if x.shape[-1] > 1:
            x = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="reflect"), k.view(1, 1, 1, 3))
        if x.shape[-2] > 1:
            x = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="reflect"), k.view(1, 1, 3, 1))
        x = torch.floor(x + 0.5)  # OpenCV's fixed-point 8-bit result rounds halves up
    return x.squeeze(1) / 255.0


def unpad(square: Tensor, height: int, width: int) -> Tensor:
    """The official crop_padding_and_resize: square [B, S, S, C] -> bilinear to the long side -> [B, H, W, C]."""
    side, top, left = square_offsets(height, width)
    y = resize_square(square.float(), side, "bilinear", antialias=False)
    return y[:, top:top + height, left:left + width]


def mask_box(mask: Tensor) -> Box:
    """Bounding box of the non-zero pixels of a [H, W] mask."""
    rows = torch.nonzero(mask.amax(dim=1) > 0).flatten()
    cols = torch.nonzero(mask.amax(dim=0) > 0).flatten()
    return Box(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def crop_around(mask: Tensor, margin: int) -> Box:
    """A square box around the mask plus ``margin`` px on each side, moved (not shrunk) to stay inside the image
    where it fits; clipped to the image where it does not."""
    h, w = mask.shape
    b = mask_box(mask)
    side = max(b.height, b.width) + 2 * margin
    cy, cx = (b.top + b.bottom) / 2.0, (b.left + b.right) / 2.0

    def span(center: float, length: int, limit: int) -> tuple[int, int]:
        length = min(length, limit)
        start = int(round(center - length / 2.0))
        start = max(0, min(start, limit - length))
        return start, start + length

    top, bottom = span(cy, side, h)
    left, right = span(cx, side, w)
    return Box(top, left, bottom, right)


def paste_back(original: Tensor, generated: Tensor, mask: Tensor, box: Box) -> Tensor:
    """Blend ``generated`` (the crop's size) into ``original`` inside ``box`` through the blurred binary mask."""
    region = original[:, box.top:box.bottom, box.left:box.right]
    alpha = blur_mask(mask[box.top:box.bottom, box.left:box.right].unsqueeze(0)).unsqueeze(-1)
    alpha = alpha.to(device=region.device, dtype=torch.float32)
    blended = generated.to(region.device).float() * alpha + region.float() * (1.0 - alpha)
    out = original.clone()
    out[:, box.top:box.bottom, box.left:box.right] = blended.to(original.dtype)
    return out
