"""Stage 2 input (paper III-C): the generated hands, background removed with their masks, placed back onto a
plain full-size canvas at the skeleton's hand positions (the inverse of the crop transform), plus the keep
mask aligned the same way and the full OpenPose skeleton (body + hands) for the outpainting ControlNet."""
from __future__ import annotations

import torch
from torch import Tensor

from .condition import paste
from .draw import draw_body, draw_hand
from .generator import HandCrops
from .keypoints import HANDS


def assemble_canvas(images: Tensor, masks: Tensor, hands: HandCrops,
                    background: tuple[float, float, float] = (0.5, 0.5, 0.5),
                    threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """(canvas IMAGE [1, H, W, 3], keep MASK [1, H, W]); mask values <= threshold count as background."""
    n = len(hands.crops)
    if images.ndim != 4 or images.shape[0] != n:
        raise ValueError(f"hand_images must be the HandGenerator's batch of {n} crop(s), got {tuple(images.shape)}")
    size = hands.crops[0].size
    if tuple(images.shape[1:3]) != (size, size):  # before the masks: they are checked against the images
        raise ValueError(f"hand_images are {images.shape[2]}x{images.shape[1]} but the crops were planned at "
                         f"{size}x{size}: connect the same HandGenerator's outputs")
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim != 3 or masks.shape[0] != n or masks.shape[1:] != images.shape[1:3]:
        raise ValueError(f"hand_masks must be {n} mask(s) of {images.shape[2]}x{images.shape[1]} (one per crop), "
                         f"got {tuple(masks.shape)}")
    h, w = hands.height, hands.width
    canvas = torch.empty(h, w, 3)
    canvas[:] = torch.tensor(background, dtype=torch.float32)
    keep = torch.zeros(h, w)
    for img, m, crop in zip(images, masks, hands.crops):
        alpha = torch.where(m > threshold, m, torch.zeros_like(m)).float()
        patch, a = paste(canvas, img[..., :3].float().cpu(), alpha.cpu(), crop)
        canvas = canvas * (1 - a.unsqueeze(-1)) + patch * a.unsqueeze(-1)
        keep = torch.maximum(keep, a)
    if float(keep.max()) <= 0.0:
        if float(masks.max()) <= 0.0:
            raise ValueError("hand_masks are empty (all black): no hand pixel to keep. Connect the Hand Generator's "
                             "hand_masks")
        raise ValueError(f"mask_threshold {threshold:g} drops every hand pixel (the hand masks reach at most "
                         f"{float(masks.max()):.2f}): nothing would be kept and the body would be drawn without the "
                         "hands. Lower mask_threshold (0 keeps every masked pixel)")
    return canvas.unsqueeze(0), keep.unsqueeze(0)


def body_skeleton(hands: HandCrops) -> Tensor:
    """[1, H, W, 3]: the person's OpenPose drawing (body and both hands) at the canvas size."""
    canvas = torch.zeros(hands.height, hands.width, 3)
    draw_body(canvas, hands.person.body)
    for side in HANDS:
        draw_hand(canvas, hands.person.hand(side), 2.0, 4.0)
    return canvas.unsqueeze(0)
