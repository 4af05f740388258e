"""Small synthetic datasets in the documented folder formats (tests, the benchmark, a smoke run).

Each hand sample is a noise background with a skin-coloured hand drawn from its own keypoints (so photo, mask
and keypoints agree); each garment sample is a person image made of its garments' colours in their regions.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch
from torch import Tensor

from ..pipelines.hands.draw import keypoint_hand_mask


def save_image(image: Tensor, path: str) -> None:
    """[H, W, 3] or [H, W] in 0..1 -> an image file (format from the extension)."""
    from PIL import Image

    a = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(a).save(path)


def synthetic_hand(cx: float, cy: float, scale: float, angle: float) -> Tensor:
    """[21, 3] OpenPose hand keypoints (pixels, confidence 1): a spread hand pointing along ``angle``."""
    points = [(0.0, 0.0)]
    for finger, spread in enumerate((-0.9, -0.35, 0.0, 0.35, 0.7)):
        for joint in range(1, 5):
            r = scale * (0.35 + 0.17 * joint) * (0.8 if finger == 0 else 1.0)
            a = angle + spread * (0.6 if finger else 1.0)
            points.append((r * torch.cos(torch.tensor(a)).item(), r * torch.sin(torch.tensor(a)).item()))
    pts = torch.tensor([[cx + x, cy + y, 1.0] for x, y in points], dtype=torch.float64)
    return pts


def write_hand_dataset(root: str, count: int = 4, size: tuple[int, int] = (96, 80), seed: int = 0,
                       masks: bool = True, two_hands_every: int = 2) -> list[str]:
    """``count`` samples (width x height ``size``) under root; every ``two_hands_every``-th has both hands."""
    g = torch.Generator().manual_seed(seed)
    width, height = size
    for sub in ("images", "keypoints", "captions") + (("masks",) if masks else ()):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    names = []
    for i in range(count):
        name = f"hand_{i:04d}"
        hands = {}
        scale = min(width, height) * 0.22
        centres = [(0.32, 0.6), (0.7, 0.55)] if two_hands_every and i % two_hands_every == 0 else [(0.5, 0.6)]
        for side, (fx, fy) in zip(("left", "right"), centres):
            angle = -1.57 + float(torch.rand((), generator=g) - 0.5)
            hands[side] = synthetic_hand(fx * width, fy * height, scale, angle)
        image = torch.rand(height, width, 3, generator=g) * 0.4 + 0.3
        mask = torch.zeros(height, width)
        skin = torch.tensor([0.9, 0.7, 0.55]) + (torch.rand(3, generator=g) - 0.5) * 0.2
        for pts in hands.values():
            mask = torch.maximum(mask, keypoint_hand_mask(pts, height, width, 0.07, 1.0).float())
        image = image * (1 - mask.unsqueeze(-1)) + skin.clamp(0, 1) * mask.unsqueeze(-1)
        save_image(image, os.path.join(root, "images", name + ".png"))
        if masks:
            save_image(mask, os.path.join(root, "masks", name + ".png"))
        person = {"pose_keypoints_2d": [0.0] * 54}
        for side, pts in hands.items():
            person[f"hand_{side}_keypoints_2d"] = [round(v, 3) for v in pts.flatten().tolist()]
        with open(os.path.join(root, "keypoints", name + ".json"), "w") as f:
            json.dump({"version": 1.3, "people": [person]}, f)
        with open(os.path.join(root, "captions", name + ".txt"), "w") as f:
            f.write(f"a photo of {'two hands' if len(hands) == 2 else 'a hand'}")
        names.append(name)
    return names


def write_garment_dataset(root: str, slots: Sequence[str] = ("upper", "lower"), count: int = 3,
                          size: tuple[int, int] = (48, 64), garment_size: tuple[int, int] = (40, 40),
                          seed: int = 0, garment_masks: bool = False) -> list[str]:
    """``count`` samples; person images width x height ``size``; slot i occupies band i of the person."""
    g = torch.Generator().manual_seed(seed)
    width, height = size
    gw, gh = garment_size
    os.makedirs(os.path.join(root, "persons"), exist_ok=True)
    os.makedirs(os.path.join(root, "captions"), exist_ok=True)
    for slot in slots:
        os.makedirs(os.path.join(root, "garments", slot), exist_ok=True)
        os.makedirs(os.path.join(root, "masks", slot), exist_ok=True)
        if garment_masks:
            os.makedirs(os.path.join(root, "garment_masks", slot), exist_ok=True)
    names = []
    band = height // (len(slots) + 1)
    for i in range(count):
        name = f"look_{i:04d}"
        person = torch.rand(height, width, 3, generator=g) * 0.2 + 0.4
        for j, slot in enumerate(slots):
            colour = torch.rand(3, generator=g)
            pattern = torch.rand(gh, gw, 1, generator=g) * 0.3
            garment = torch.ones(gh, gw, 3)
            gmask = torch.zeros(gh, gw)
            gmask[gh // 8: gh - gh // 8, gw // 6: gw - gw // 6] = 1.0
            garment = garment * (1 - gmask.unsqueeze(-1)) + (colour * 0.7 + pattern) .clamp(0, 1) * gmask.unsqueeze(-1)
            region = torch.zeros(height, width)
            region[band * j + band // 2: band * (j + 1) + band // 2, width // 5: width - width // 5] = 1.0
            person = person * (1 - region.unsqueeze(-1)) + colour * region.unsqueeze(-1)
            save_image(garment, os.path.join(root, "garments", slot, name + ".png"))
            save_image(region, os.path.join(root, "masks", slot, name + ".png"))
            if garment_masks:
                save_image(gmask, os.path.join(root, "garment_masks", slot, name + ".png"))
        save_image(person, os.path.join(root, "persons", name + ".png"))
        with open(os.path.join(root, "captions", name + ".txt"), "w") as f:
            f.write(f"a person wearing {' and '.join(slots)} garments")
        names.append(name)
    return names
