"""IMAGE [B, H, W, C] and MASK [B, H, W] inputs in ComfyUI's layouts: checks that name the input, resizing, and
the one pair of layout flips to and from torch's [B, C, H, W].

Pure torch and shared by every method folder (hands/ may not import references/, so these live above both).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch.nn.functional as F
from torch import Tensor

from .notices import warn


def to_bchw(image: Tensor) -> Tensor:
    """ComfyUI's channels-last [..., H, W, C] -> torch's channels-first [..., C, H, W] (a view)."""
    return image.movedim(-1, -3)


def to_bhwc(x: Tensor) -> Tensor:
    """torch's [..., C, H, W] -> ComfyUI's [..., H, W, C] (a view)."""
    return x.movedim(-3, -1)


def resize_image(image: Tensor, size: tuple[int, int], mode: str = "bicubic", antialias: bool = True) -> Tensor:
    """[B, H, W, C] -> [B, h, w, C] in 0..1; bicubic with antialiasing is PIL's resize (no aspect kept)."""
    if tuple(image.shape[1:3]) == tuple(size):
        return image
    corners = {} if mode == "nearest" else {"align_corners": False}
    x = F.interpolate(to_bchw(image).float(), size=tuple(size), mode=mode, antialias=antialias, **corners)
    return to_bhwc(x).clamp(0.0, 1.0).to(image.dtype)


def resize_square(image: Tensor, size: int, mode: str = "bicubic", antialias: bool = True) -> Tensor:
    """[B, S, S, C] -> [B, size, size, C] in 0..1: :func:`resize_image` to a square side."""
    return resize_image(image, (size, size), mode, antialias)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, H, W] -> [B, h, w], bilinear, clamped to 0..1."""
    if tuple(mask.shape[1:3]) == tuple(size):
        return mask
    m = F.interpolate(mask.unsqueeze(1).float(), size=tuple(size), mode="bilinear", align_corners=False)
    return m.squeeze(1).clamp(0.0, 1.0)


def check_image(image: Any, name: str, channels: tuple[int, ...] = (3, 4)) -> Tensor:
    """An IMAGE input [batch, height, width, C] with C in ``channels``, or an error naming it."""
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[-1] not in channels:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{name} must be an IMAGE [batch, height, width, channels], got {shape}")
    return image


WHITE, BLACK = 1.0, 0.0


def flatten_alpha(image: Tensor, background: float = WHITE) -> tuple[Tensor, Optional[Tensor]]:
    """The pack's one rule for a 4-channel (RGBA) IMAGE: (RGB composited over ``background`` by the alpha, the
    alpha [B, H, W] or None for an RGB image).

    Pictures (references, parts, garments, images to edit, canvases) go over white, the colour the official
    Parts2Whole and MimicBrush code composites cut-outs on; control maps (pose, depth) over black, their
    background. Where a node takes a mask for that image and none is connected, the alpha is the mask.
    """
    if image.shape[-1] != 4:
        return image, None
    alpha = image[..., 3:4]
    return image[..., :3] * alpha + background * (1.0 - alpha), image[..., 3]


def check_mask(mask: Tensor, name: str, count: int, image_name: str) -> Tensor:
    """A MASK input for a batch of ``count`` images: [1 or count, H, W] float (one mask for all, or one each)."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a MASK [batch, height, width], got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, count):
        raise ValueError(f"{name} has {mask.shape[0]} masks but {image_name} has {count} images: "
                         "give one mask for all, or one per image")
    return mask.float()


def one_mask(mask: Any, name: str) -> Tensor:
    """A MASK input that must hold exactly one mask -> [H, W] float."""
    if isinstance(mask, Tensor) and mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be one MASK [1, height, width], got shape {shape}")
    return mask.float()


def fit_mask(mask: Tensor, size: tuple[int, int], name: str, image_name: str,
             resize: Callable[[Tensor, tuple[int, int]], Tensor] = resize_mask) -> Tensor:
    """A mask [B, H, W] of another size than its image is resized to the image's (h, w), with a warning."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    warn(f"{name} is {mask.shape[-1]}x{mask.shape[-2]} but {image_name} is {size[1]}x{size[0]}; the mask is "
         "stretched to the image (give a mask of the image's size to place it exactly)")
    return resize(mask, size)


def check_not_empty(masks: Tensor, name: str, why: str) -> None:
    """Refuses a mask [B, H, W] with an all-zero item; ``why`` says what it would do and what to do instead."""
    for i in range(masks.shape[0]):
        if float(masks[i].max()) <= 0.0:
            which = name if masks.shape[0] == 1 else f"{name} (batch item {i})"
            raise ValueError(f"{which} is empty (all zero): {why}")
