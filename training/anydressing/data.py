"""AnyDressing garment weights' dataset: the folder format and its validator, and the training examples.

Folder (``--data DIR --slots upper,lower``; files of one sample share a name)::

    DIR/persons/<name>.png                  the person wearing the garments (the target image)
    DIR/garments/<slot>/<name>.png          each slot's garment image (in-shop or cut from a photo)
    DIR/masks/<slot>/<name>.png             each slot's garment region on the person (white = that garment),
                                            person-sized: the localization loss's target
    DIR/garment_masks/<slot>/<name>.png     optional folder per slot: the garment's pixels in its own image
                                            (background tokens are left out, as the node's mask_N input)
    DIR/captions/<name>.txt                 the caption

Example geometry: the person image and its garment regions are scaled to cover height x width and
centre-cropped; every garment is scaled to fit inside height x width (aspect kept, as the node keeps it) and
centred on white. The garment's token mask is its garment mask when one is given, else the garment's own area,
so the white padding that batching needs is left out of the dressing attention (at inference there is no padding).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ...pipelines.anydressing.weights import SLOT_NAME
from ..datasets import (
    IMAGE_EXTENSIONS,
    Problem,
    Report,
    check_caption,
    check_mask,
    check_samples,
    image_size,
    index_folder,
    orphans,
    read_caption,
    read_image,
    read_mask,
    relative,
    require_folder,
)


@dataclass(frozen=True)
class GarmentSample:
    name: str
    person: str
    garments: tuple[str, ...]  # per slot
    regions: tuple[str, ...]  # per slot: the garment's mask on the person
    garment_masks: tuple[Optional[str], ...]  # per slot, None when the slot has no garment_masks/ folder
    caption: str


def parse_slots(text: str | Sequence[str]) -> tuple[str, ...]:
    slots = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not slots:
        raise ValueError("--slots is empty: name the garment slots, e.g. --slots upper,lower")
    bad = [s for s in slots if not SLOT_NAME.match(s)]
    if bad:
        raise ValueError(f"--slots: slot names are letters, digits, '_' or '-', got {bad}")
    if len(set(slots)) != len(slots):
        raise ValueError(f"--slots names a slot twice: {slots}")
    return tuple(slots)


def garment_samples(root: str, slots: Sequence[str], report: Optional[Report] = None
                    ) -> tuple[list[GarmentSample], Report]:
    """The samples of a garment dataset folder (paths only; nothing decoded)."""
    report = report or Report("garment", root)
    if not os.path.isdir(root):
        report.errors.append(Problem("", root, "is not a directory"))
        return [], report
    have_persons = require_folder(root, "persons", report, "the target images, persons/<name>.png")
    require_folder(root, "captions", report, "a caption per person image, captions/<name>.txt")
    for slot in slots:
        require_folder(root, f"garments/{slot}", report, f"the {slot} garment images, garments/{slot}/<name>.png")
        require_folder(root, f"masks/{slot}", report, f"the {slot} garment's region on each person image, "
                                                      f"masks/{slot}/<name>.png")
    persons = index_folder(os.path.join(root, "persons"), root, report, IMAGE_EXTENSIONS)
    captions = index_folder(os.path.join(root, "captions"), root, report, (".txt",))
    if have_persons and not persons:
        report.errors.append(Problem("", "persons/", "has no images"))
    names = set(persons)
    orphans(captions, names, root, report, "caption")
    per_slot = []
    for slot in slots:
        g = index_folder(os.path.join(root, "garments", slot), root, report, IMAGE_EXTENSIONS)
        r = index_folder(os.path.join(root, "masks", slot), root, report, IMAGE_EXTENSIONS)
        gm_dir = os.path.join(root, "garment_masks", slot)
        gm = index_folder(gm_dir, root, report, IMAGE_EXTENSIONS) if os.path.isdir(gm_dir) else None
        for index, what in ((g, f"{slot} garment"), (r, f"{slot} region mask"), (gm or {}, f"{slot} garment mask")):
            orphans(index, names, root, report, what)
        per_slot.append((slot, g, r, gm))
    samples = []
    for name in sorted(persons):
        samples.append(GarmentSample(
            name, persons[name],
            tuple(g.get(name, os.path.join(root, "garments", s, name + ".png")) for s, g, _, _ in per_slot),
            tuple(r.get(name, os.path.join(root, "masks", s, name + ".png")) for s, _, r, _ in per_slot),
            tuple(None if gm is None else gm.get(name, os.path.join(root, "garment_masks", s, name + ".png"))
                  for s, _, _, gm in per_slot),
            captions.get(name, os.path.join(root, "captions", name + ".txt"))))
    return samples, report


def check_garment_sample(sample: GarmentSample, slots: Sequence[str], root: str) -> list[Problem]:
    """Every problem of one sample (empty list: trainable)."""
    problems: list[Problem] = []

    def bad(path: str, message: str) -> None:
        problems.append(Problem(sample.name, relative(path, root), message))

    size = image_size(sample.person, bad)
    for slot, garment, region, gmask in zip(slots, sample.garments, sample.regions, sample.garment_masks):
        gsize = None
        if not os.path.isfile(garment):
            bad(garment, f"missing {slot} garment image")
        else:
            try:
                g = read_image(garment)
                gsize = (g.shape[1], g.shape[0])
                if min(gsize) < 8:
                    bad(garment, f"is {gsize[0]}x{gsize[1]}: too small for a garment image")
            except ValueError as e:
                bad(garment, str(e))
        check_mask(region, size, "the person image",
                   f"missing mask of the {slot} garment on the person (the localization loss's target)",
                   f"the {slot} garment is nowhere on the person", bad)
        if gmask is not None:
            check_mask(gmask, gsize, "the garment image",
                       f"missing garment mask (garment_masks/{slot}/ exists, so every {slot} garment needs one)",
                       "it would keep nothing of the garment", bad)
    check_caption(sample.caption, bad)
    return problems


def validate_garment_dataset(root: str, slots: str | Sequence[str], workers: Optional[int] = None) -> Report:
    slots = parse_slots(slots)
    samples, report = garment_samples(root, slots)
    return check_samples(samples, lambda s: check_garment_sample(s, slots, root), report, workers)


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
