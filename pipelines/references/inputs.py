"""Reference image and mask preparation in ComfyUI's layouts (IMAGE [B,H,W,C] in 0..1, MASK [B,H,W]).

Pure torch: one PreparedReference per image at a writer-friendly size; the input checks are ``pipelines.images``'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..images import check_image, check_mask, check_not_empty, fit_mask, flatten_alpha, resize_image, resize_mask
from ..notices import warn


@dataclass(frozen=True, eq=False)
class PreparedReference:
    image: Tensor  # [H, W, 3], H and W multiples of 8
    mask: Optional[Tensor]  # [H, W] in 0..1, or None (the whole reference)
    label: str
    slot: int  # which input it came from (0-based)


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
        image, alpha = flatten_alpha(check_image(image, iname))
        if mask is None and alpha is not None and float(alpha.min()) < 1.0:
            mask = alpha  # the cut-out's alpha selects the reference (README: RGBA images)
            mname = f"{iname} alpha"
        count, height, width = image.shape[0], image.shape[1], image.shape[2]
        labels = split_labels(label, count, lname)
        if mask is not None:
            mask = fit_mask(check_mask(mask, mname, count, iname), (height, width), mname, iname)
            check_not_empty(mask, mname, f"it would select nothing of {iname}; disconnect it to use the whole "
                                         "reference")
        size = writer_size(height, width, max_side)
        if size != (height, width) and max_side <= 0:
            warn(f"{iname} is {width}x{height}; it is read at {size[1]}x{size[0]} (multiples of 8)")
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
