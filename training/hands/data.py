"""The hand generator's dataset: the folder format and its validator, and the training examples.

Folder (``--data DIR``; files of one sample share a name)::

    DIR/images/<name>.png          a photo with one or two hands (any size; crops are cut around the hands)
    DIR/keypoints/<name>.json      OpenPose JSON: people[i].hand_left_keypoints_2d / hand_right_keypoints_2d,
                                   21 points x (x, y, confidence), pixels or normalised 0..1 (+ optional body)
    DIR/masks/<name>.png           optional folder: the hand segmentation mask (white = hand), image-sized;
                                   when the folder exists, every image needs one
    DIR/captions/<name>.txt        the caption (UTF-8 text)

Examples are square crops around the hands, the 11-channel condition and the mask target. The crop, the
heatmaps and the keypoint masks are the inference code's own (``pipelines.hands.condition``), so the generator
is trained on exactly the condition the HandGenerator node builds. Per sample (paper IV-A): one crop for both
hands when their squares intersect, else one hand's crop at random; RGB shift and brightness/contrast on the
photo; the condition's mask channel zero-filled with probability 0.5 (III-B).

Randomness comes from a generator seeded by (seed, epoch, index), so an example is the same whichever
worker builds it and a resumed run sees the same data it would have seen.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...pipelines.hands.condition import (
    CONDITION_CHANNELS,
    HandCrop,
    crop_image,
    hand_condition,
    keypoint_mask,
    plan_crops,
)
from ...pipelines.hands.keypoints import HANDS, MIN_HAND_POINTS, Person, parse_pose
from ..augment import ColorAugment, augment_colors
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

MASK_CHANNEL = CONDITION_CHANNELS - 1
CROPS = ("auto", "none")
MASK_SOURCES = ("files", "keypoints")


@dataclass(frozen=True)
class HandSample:
    name: str
    image: str
    keypoints: str
    mask: Optional[str]
    caption: str


def read_pose(path: str, width: int, height: int, min_confidence: float = 0.3) -> Person:
    """The first person with a hand in an OpenPose JSON file, in pixels (the HandGenerator node's parser)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"is not valid JSON ({e})") from None
    frames = parse_pose(data, "auto", min_confidence, width, height)
    for person in frames[0].people:
        if person.left_hand is not None or person.right_hand is not None:
            return person
    raise ValueError(f"has no person with a hand (at least {MIN_HAND_POINTS} keypoints of confidence >= "
                     f"{min_confidence} in hand_left_keypoints_2d or hand_right_keypoints_2d)")


def hand_samples(root: str, report: Optional[Report] = None) -> tuple[list[HandSample], Report]:
    """The samples of a hand dataset folder (paths only; nothing decoded)."""
    report = report or Report("hand", root)
    if not os.path.isdir(root):
        report.errors.append(Problem("", root, "is not a directory"))
        return [], report
    have_images = require_folder(root, "images", report, "the photos, images/<name>.png")
    require_folder(root, "keypoints", report, "OpenPose JSON per image, keypoints/<name>.json")
    require_folder(root, "captions", report, "a caption per image, captions/<name>.txt")
    images = index_folder(os.path.join(root, "images"), root, report, IMAGE_EXTENSIONS)
    keypoints = index_folder(os.path.join(root, "keypoints"), root, report, (".json",))
    captions = index_folder(os.path.join(root, "captions"), root, report, (".txt",))
    has_masks = os.path.isdir(os.path.join(root, "masks"))
    masks = index_folder(os.path.join(root, "masks"), root, report, IMAGE_EXTENSIONS)
    if have_images and not images:
        report.errors.append(Problem("", "images/", "has no images"))
    names = set(images)
    for index, what in ((keypoints, "keypoint file"), (captions, "caption"), (masks, "mask")):
        orphans(index, names, root, report, what)
    samples = []
    for name in sorted(images):
        samples.append(HandSample(
            name, images[name], keypoints.get(name, os.path.join(root, "keypoints", name + ".json")),
            masks.get(name, os.path.join(root, "masks", name + ".png")) if has_masks else None,
            captions.get(name, os.path.join(root, "captions", name + ".txt"))))
    return samples, report


def check_hand_sample(sample: HandSample, root: str, min_confidence: float = 0.3) -> list[Problem]:
    """Every problem of one sample (empty list: trainable)."""
    problems: list[Problem] = []

    def bad(path: str, message: str) -> None:
        problems.append(Problem(sample.name, relative(path, root), message))

    size = image_size(sample.image, bad)
    if not os.path.isfile(sample.keypoints):
        bad(sample.keypoints, "missing keypoint file (OpenPose JSON with hand_left/right_keypoints_2d)")
    elif size is not None:
        try:
            read_pose(sample.keypoints, size[0], size[1], min_confidence)
        except ValueError as e:
            bad(sample.keypoints, str(e).removeprefix("pose: "))
    if sample.mask is not None:
        check_mask(sample.mask, size, "the image",
                   "missing mask (the masks/ folder exists, so every image needs its hand mask)", "no hand pixels",
                   bad)
    check_caption(sample.caption, bad)
    return problems


def validate_hand_dataset(root: str, min_confidence: float = 0.3, workers: Optional[int] = None) -> Report:
    samples, report = hand_samples(root)
    check_samples(samples, lambda s: check_hand_sample(s, root, min_confidence), report, workers)
    if samples and not any(s.mask for s in samples):
        report.warnings.append(Problem("", "masks/", "no masks/ folder: the mask head learns the keypoint-drawn "
                                                     "hand silhouette (--mask-source keypoints)"))
    return report


@dataclass(frozen=True)
class HandDataConfig:
    resolution: int = 512
    crop: str = "auto"  # auto: around the hands (paper); none: the image's centre square
    crop_scale: float = 1.5
    sigma: Optional[float] = None  # heatmap sigma in crop pixels; None = resolution / 64 (the node's default)
    min_confidence: float = 0.3
    mask_source: str = "files"  # files: masks/; keypoints: the keypoint-drawn silhouette
    keypoint_mask_dilation: float = 8.0  # px at 512, as the node's training-free mask
    mask_dropout: float = 0.5
    augment: Optional[ColorAugment] = ColorAugment()

    def __post_init__(self) -> None:
        if self.resolution < 64 or self.resolution % 8:
            raise ValueError(f"--resolution must be a multiple of 8 and at least 64, got {self.resolution}")
        if self.crop not in CROPS:
            raise ValueError(f"--crop must be one of {CROPS}, got {self.crop!r}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"--mask-source must be one of {MASK_SOURCES}, got {self.mask_source!r}")
        if not 0.0 <= self.mask_dropout <= 1.0:
            raise ValueError(f"--mask-dropout must be within 0..1, got {self.mask_dropout}")


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + index)


def drop_mask_channel(condition: Tensor, p: float, generator: torch.Generator) -> tuple[Tensor, bool]:
    """Zero-fill the condition's mask channel with probability p (one draw, always consumed)."""
    drop = bool(torch.rand((), generator=generator, dtype=torch.float64) < p)
    if drop:
        condition = condition.clone()
        condition[MASK_CHANNEL] = 0.0
    return condition, drop


def centre_crop(person: Person, width: int, height: int, size: int) -> HandCrop:
    side = min(width, height)
    hands = tuple(s for s in HANDS if person.hand(s) is not None)
    return HandCrop((width - side) // 2, (height - side) // 2, side, size, hands)


def choose_crop(person: Person, config: HandDataConfig, width: int, height: int,
                generator: torch.Generator) -> HandCrop:
    pick = int(torch.randint(0, 2, (), generator=generator))  # always drawn
    if config.crop == "none":
        return centre_crop(person, width, height, config.resolution)
    crops = plan_crops(person, config.resolution, config.crop_scale)
    return crops[pick % len(crops)] if len(crops) > 1 else crops[0]


class HandDataset(Dataset):
    """Items are (epoch, index) pairs (see :class:`training.loop.EpochSampler`)."""

    def __init__(self, samples: Sequence[HandSample], config: HandDataConfig, seed: int = 0) -> None:
        if not samples:
            raise ValueError("the hand dataset has no usable samples")
        if config.mask_source == "files" and any(s.mask is None for s in samples):
            raise ValueError("--mask-source files needs a masks/ folder with one mask per image; use "
                             "--mask-source keypoints to train the mask head on keypoint-drawn silhouettes")
        self.samples = list(samples)
        self.config = config
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        return self.example(index, sample_generator(self.seed, epoch, index))

    def example(self, index: int, generator: torch.Generator) -> dict:
        cfg = self.config
        s = self.samples[index]
        image = read_image(s.image)
        height, width = image.shape[:2]
        person = read_pose(s.keypoints, width, height, cfg.min_confidence)
        crop = choose_crop(person, cfg, width, height, generator)
        size = cfg.resolution
        if cfg.mask_source == "files":
            mask = crop_image(read_mask(s.mask).unsqueeze(-1), crop)[..., 0].clamp(0.0, 1.0)
        else:
            mask = keypoint_mask(person, crop, cfg.keypoint_mask_dilation * size / 512.0)
        condition = hand_condition(person, crop, cfg.sigma, mask)
        condition, dropped = drop_mask_channel(condition, cfg.mask_dropout, generator)
        photo = augment_colors(crop_image(image, crop), cfg.augment, generator)
        return {
            "image": photo.permute(2, 0, 1).contiguous() * 2.0 - 1.0,  # [3, S, S] in -1..1
            "condition": condition,  # [11, S, S]
            "mask": mask.float(),  # [S, S]
            "mask_dropped": dropped,
            "caption": read_caption(s.caption),
            "name": s.name,
        }


def collate(items: Sequence[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
