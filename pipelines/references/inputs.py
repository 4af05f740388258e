"""Reference image and mask preparation in ComfyUI's layouts (IMAGE [B,H,W,C] in 0..1, MASK [B,H,W]).

Pure torch: checks that name the offending input, resizing to a writer-friendly size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("humanref")


@dataclass(frozen=True, eq=False)
class PreparedReference:
    image: Tensor  # [H, W, 3], H and W multiples of 8
    mask: Optional[Tensor]  # [H, W] in 0..1, or None (the whole reference)
    label: str
    slot: int  # which input it came from (0-based)


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, H, W, C] -> [B, h, w, C], bicubic with antialiasing, clamped to 0..1."""
    if tuple(image.shape[1:3]) == tuple(size):
        return image
    x = image.movedim(-1, 1).float()
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x.movedim(1, -1).clamp(0.0, 1.0).to(image.dtype)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, H, W] -> [B, h, w], bilinear, clamped to 0..1."""
    if tuple(mask.shape[1:3]) == tuple(size):
        return mask
    m = F.interpolate(mask.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)
    return m.squeeze(1).clamp(0.0, 1.0)


def writer_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """Keep the aspect ratio, fit the long side into max_side (0 = keep), round to multiples of 8."""
    scale = 1.0 if max_side <= 0 or max(height, width) <= max_side else max_side / max(height, width)
    h = max(8, int(round(height * scale / 8)) * 8)
    w = max(8, int(round(width * scale / 8)) * 8)
    return h, w


def split_labels(label: str, count: int, name: str) -> list[str]:
    """One label for the whole batch, or one line per image."""
    lines = [line.strip() for line in label.splitlines() if line.strip()]
    if not lines:
        return [""] * count
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"{name} has {len(lines)} lines but its image batch has {count} images: "
                         "give one label, or one label per line for every image")
    return lines


def prepare_references(
    inputs: list[tuple[int, Tensor, Optional[Tensor], str]],
    max_side: int,
    max_references: int,
) -> list[PreparedReference]:
    """(input number, IMAGE, MASK or None, label) per connected input -> one PreparedReference per image."""
    refs: list[PreparedReference] = []
    for number, image, mask, label in inputs:
        iname, mname, lname = f"image_{number}", f"mask_{number}", f"label_{number}"
        if image.ndim != 4 or image.shape[-1] not in (3, 4):
            raise ValueError(f"{iname} must be an IMAGE [batch, height, width, channels], got {tuple(image.shape)}")
        image = image[..., :3]
        count, height, width = image.shape[0], image.shape[1], image.shape[2]
        labels = split_labels(label, count, lname)
        if mask is not None:
            if mask.ndim == 2:
                mask = mask.unsqueeze(0)
            if mask.ndim != 3:
                raise ValueError(f"{mname} must be a MASK [batch, height, width], got {tuple(mask.shape)}")
            if mask.shape[0] not in (1, count):
                raise ValueError(f"{mname} has {mask.shape[0]} masks but {iname} has {count} images: "
                                 "give one mask for all, or one per image")
            if tuple(mask.shape[1:]) != (height, width):
                log.warning("HumanRef: %s is %dx%d but %s is %dx%d; resizing the mask to the image",
                            mname, mask.shape[2], mask.shape[1], iname, width, height)
                mask = resize_mask(mask, (height, width))
            for i in range(mask.shape[0]):
                if float(mask[i].max()) <= 0.0:
                    which = f"{mname}" if mask.shape[0] == 1 else f"{mname} (batch item {i})"
                    raise ValueError(f"{which} is empty (all zero): it would select nothing of {iname}; "
                                     "disconnect it to use the whole reference")
        size = writer_size(height, width, max_side)
        if size != (height, width) and max_side <= 0:
            log.warning("HumanRef: %s is %dx%d; using %dx%d (multiples of 8) for the writer",
                        iname, width, height, size[1], size[0])
        images = resize_image(image, size)
        masks = None if mask is None else resize_mask(mask, size)
        for i in range(count):
            m = None if masks is None else masks[i if masks.shape[0] == count else 0]
            refs.append(PreparedReference(images[i], m, labels[i], number - 1))
    if not refs:
        raise ValueError("no reference images: connect image_1")
    if len(refs) > max_references:
        raise ValueError(f"{len(refs)} reference images were given but at most {max_references} are supported "
                         "(count every image of every batch)")
    return refs
