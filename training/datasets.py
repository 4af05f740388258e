"""Training dataset folders (hand generator, garment weights), their readers and the validator.

Files of one sample share a name (the file stem) across folders; images may be PNG, JPEG, WebP or BMP.

Hand generator (``--data DIR``)::

    DIR/images/<name>.png          a photo with one or two hands (any size; crops are cut around the hands)
    DIR/keypoints/<name>.json      OpenPose JSON: people[i].hand_left_keypoints_2d / hand_right_keypoints_2d,
                                   21 points x (x, y, confidence), pixels or normalised 0..1 (+ optional body)
    DIR/masks/<name>.png           optional folder: the hand segmentation mask (white = hand), image-sized;
                                   when the folder exists, every image needs one
    DIR/captions/<name>.txt        the caption (UTF-8 text)

Garment weights (``--data DIR --slots upper,lower``)::

    DIR/persons/<name>.png                  the person wearing the garments (the target image)
    DIR/garments/<slot>/<name>.png          each slot's garment image (in-shop or cut from a photo)
    DIR/masks/<slot>/<name>.png             each slot's garment region on the person (white = that garment),
                                            person-sized: the localization loss's target
    DIR/garment_masks/<slot>/<name>.png     optional folder per slot: the garment's pixels in its own image
                                            (background tokens are left out, as the node's mask_N input)
    DIR/captions/<name>.txt                 the caption

Everything is checked before training (:func:`validate_hand_dataset`, :func:`validate_garment_dataset`): every
file a sample needs exists, decodes, has the right size and content; the report lists every problem at once.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_SIDE = 32
SLOT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Problem:
    sample: str  # the sample's name, "" for the dataset as a whole
    path: str
    message: str

    def __str__(self) -> str:
        where = self.path or self.sample or "dataset"
        return f"{where}: {self.message}"


@dataclass
class Report:
    kind: str
    root: str
    samples: list[str] = field(default_factory=list)  # names of the samples without errors
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.samples)

    def format(self, limit: int = 50) -> str:
        lines = [f"{self.kind} dataset {self.root}: {len(self.samples)} usable sample(s), {len(self.errors)} "
                 f"error(s), {len(self.warnings)} warning(s)"]
        for title, items in (("error", self.errors), ("warning", self.warnings)):
            for p in items[:limit]:
                lines.append(f"  {title}: {p}")
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more {title}s")
        return "\n".join(lines)


# ---- readers (training uses the same ones) -----------------------------------------------------------------

def read_image(path: str) -> Tensor:
    """[H, W, 3] float32 in 0..1; ValueError when the file does not decode as an image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(f"cannot be read as an image ({type(e).__name__}: {e})") from None
    return _to_tensor(rgb).float() / 255.0


def read_mask(path: str) -> Tensor:
    """[H, W] float32 in 0..1 (white = 1); an alpha channel, when present, is the mask."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            gray = im.getchannel("A") if "A" in im.getbands() else im.convert("L")
    except Exception as e:
        raise ValueError(f"cannot be read as a mask image ({type(e).__name__}: {e})") from None
    return _to_tensor(gray).float()[..., 0] / 255.0


def _to_tensor(im) -> Tensor:
    import numpy as np

    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    return torch.from_numpy(a.copy())


def read_caption(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None


def read_pose(path: str, width: int, height: int, min_confidence: float = 0.3):
    """The first person with a hand in an OpenPose JSON file, in pixels (from pipelines.keypoints)."""
    from ..pipelines.hands.keypoints import MIN_HAND_POINTS, parse_pose

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


# ---- folder scanning ---------------------------------------------------------------------------------------

def _index(folder: str, root: str, report: Report, extensions: Sequence[str]) -> dict[str, str]:
    """stem -> path of the files in folder with one of the extensions; two files for one stem is an error."""
    found: dict[str, str] = {}
    if not os.path.isdir(folder):
        return found
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        stem, ext = os.path.splitext(entry)
        if entry.startswith(".") or not os.path.isfile(path):
            continue
        if ext.lower() not in extensions:
            report.warnings.append(Problem("", _rel(path, root), f"ignored (not one of {', '.join(extensions)})"))
            continue
        if stem in found:
            report.errors.append(Problem(stem, _rel(path, root), f"a second file for sample {stem!r} (also "
                                                                 f"{_rel(found[stem], root)}): keep one"))
            continue
        found[stem] = path
    return found


def _image_size(path: str, bad: Callable[[str, str], None]) -> Optional[tuple[int, int]]:
    """(width, height) of a readable image of at least MIN_SIDE px; otherwise reports it and returns None."""
    try:
        img = read_image(path)
    except ValueError as e:
        bad(path, str(e))
        return None
    size = (img.shape[1], img.shape[0])
    if min(size) < MIN_SIDE:
        bad(path, f"is {size[0]}x{size[1]}; images need at least {MIN_SIDE} px on each side")
    return size


def _check_caption(path: str, bad: Callable[[str, str], None]) -> None:
    """Reports a missing or unreadable caption file."""
    if not os.path.isfile(path):
        bad(path, "missing caption (captions/<name>.txt)")
        return
    try:
        read_caption(path)
    except ValueError as e:
        bad(path, str(e))


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root)


def _require_folder(root: str, name: str, report: Report, what: str) -> bool:
    if not os.path.isdir(os.path.join(root, name)):
        report.errors.append(Problem("", name + "/", f"missing folder ({what})"))
        return False
    return True


def _orphans(index: dict[str, str], names: set[str], root: str, report: Report, what: str) -> None:
    for stem, path in index.items():
        if stem not in names:
            report.warnings.append(Problem(stem, _rel(path, root), f"{what} without a matching image (ignored)"))


def _check_samples(names: Sequence[str], check: Callable[[str], list[Problem]], workers: int) -> list[list[Problem]]:
    if workers <= 1 or len(names) < 8:
        return [check(n) for n in names]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check, names))


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ---- hand generator ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HandSample:
    name: str
    image: str
    keypoints: str
    mask: Optional[str]
    caption: str


def hand_samples(root: str, report: Optional[Report] = None) -> tuple[list[HandSample], Report]:
    """The samples of a hand dataset folder (paths only; nothing decoded)."""
    report = report or Report("hand", root)
    if not os.path.isdir(root):
        report.errors.append(Problem("", root, "is not a directory"))
        return [], report
    have_images = _require_folder(root, "images", report, "the photos, images/<name>.png")
    _require_folder(root, "keypoints", report, "OpenPose JSON per image, keypoints/<name>.json")
    _require_folder(root, "captions", report, "a caption per image, captions/<name>.txt")
    images = _index(os.path.join(root, "images"), root, report, IMAGE_EXTENSIONS)
    keypoints = _index(os.path.join(root, "keypoints"), root, report, (".json",))
    captions = _index(os.path.join(root, "captions"), root, report, (".txt",))
    has_masks = os.path.isdir(os.path.join(root, "masks"))
    masks = _index(os.path.join(root, "masks"), root, report, IMAGE_EXTENSIONS)
    if have_images and not images:
        report.errors.append(Problem("", "images/", "has no images"))
    names = set(images)
    for index, what in ((keypoints, "keypoint file"), (captions, "caption"), (masks, "mask")):
        _orphans(index, names, root, report, what)
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
        problems.append(Problem(sample.name, _rel(path, root), message))

    size = _image_size(sample.image, bad)
    if not os.path.isfile(sample.keypoints):
        bad(sample.keypoints, "missing keypoint file (OpenPose JSON with hand_left/right_keypoints_2d)")
    elif size is not None:
        try:
            read_pose(sample.keypoints, size[0], size[1], min_confidence)
        except ValueError as e:
            bad(sample.keypoints, str(e).removeprefix("pose: "))
    if sample.mask is not None:
        if not os.path.isfile(sample.mask):
            bad(sample.mask, "missing mask (the masks/ folder exists, so every image needs its hand mask)")
        else:
            try:
                m = read_mask(sample.mask)
                if size is not None and (m.shape[1], m.shape[0]) != size:
                    bad(sample.mask, f"is {m.shape[1]}x{m.shape[0]} but the image is {size[0]}x{size[1]}")
                elif float(m.max()) <= 0.0:
                    bad(sample.mask, "is empty (all black): no hand pixels")
            except ValueError as e:
                bad(sample.mask, str(e))
    _check_caption(sample.caption, bad)
    return problems


def validate_hand_dataset(root: str, min_confidence: float = 0.3, workers: Optional[int] = None) -> Report:
    samples, report = hand_samples(root)
    results = _check_samples(samples, lambda s: check_hand_sample(s, root, min_confidence),
                             workers or _default_workers())
    for sample, problems in zip(samples, results):
        if problems:
            report.errors.extend(problems)
        else:
            report.samples.append(sample.name)
            if not read_caption(sample.caption):
                report.warnings.append(Problem(sample.name, _rel(sample.caption, root), "empty caption"))
    if samples and not any(s.mask for s in samples):
        report.warnings.append(Problem("", "masks/", "no masks/ folder: the mask head learns the keypoint-drawn "
                                                     "hand silhouette (--mask-source keypoints)"))
    return report


# ---- garments ----------------------------------------------------------------------------------------------

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
    report = report or Report("garment", root)
    if not os.path.isdir(root):
        report.errors.append(Problem("", root, "is not a directory"))
        return [], report
    have_persons = _require_folder(root, "persons", report, "the target images, persons/<name>.png")
    _require_folder(root, "captions", report, "a caption per person image, captions/<name>.txt")
    for slot in slots:
        _require_folder(root, f"garments/{slot}", report, f"the {slot} garment images, garments/{slot}/<name>.png")
        _require_folder(root, f"masks/{slot}", report, f"the {slot} garment's region on each person image, "
                                                       f"masks/{slot}/<name>.png")
    persons = _index(os.path.join(root, "persons"), root, report, IMAGE_EXTENSIONS)
    captions = _index(os.path.join(root, "captions"), root, report, (".txt",))
    if have_persons and not persons:
        report.errors.append(Problem("", "persons/", "has no images"))
    names = set(persons)
    _orphans(captions, names, root, report, "caption")
    per_slot = []
    for slot in slots:
        g = _index(os.path.join(root, "garments", slot), root, report, IMAGE_EXTENSIONS)
        r = _index(os.path.join(root, "masks", slot), root, report, IMAGE_EXTENSIONS)
        gm_dir = os.path.join(root, "garment_masks", slot)
        gm = _index(gm_dir, root, report, IMAGE_EXTENSIONS) if os.path.isdir(gm_dir) else None
        for index, what in ((g, f"{slot} garment"), (r, f"{slot} region mask"), (gm or {}, f"{slot} garment mask")):
            _orphans(index, names, root, report, what)
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
    problems: list[Problem] = []

    def bad(path: str, message: str) -> None:
        problems.append(Problem(sample.name, _rel(path, root), message))

    size = _image_size(sample.person, bad)
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
        if not os.path.isfile(region):
            bad(region, f"missing mask of the {slot} garment on the person (the localization loss's target)")
        else:
            try:
                m = read_mask(region)
                if size is not None and (m.shape[1], m.shape[0]) != size:
                    bad(region, f"is {m.shape[1]}x{m.shape[0]} but the person image is {size[0]}x{size[1]}")
                elif float(m.max()) <= 0.0:
                    bad(region, f"is empty (all black): the {slot} garment is nowhere on the person")
            except ValueError as e:
                bad(region, str(e))
        if gmask is not None:
            if not os.path.isfile(gmask):
                bad(gmask, f"missing garment mask (garment_masks/{slot}/ exists, so every {slot} garment needs one)")
            else:
                try:
                    m = read_mask(gmask)
                    if gsize is not None and (m.shape[1], m.shape[0]) != gsize:
                        bad(gmask, f"is {m.shape[1]}x{m.shape[0]} but the garment image is {gsize[0]}x{gsize[1]}")
                    elif float(m.max()) <= 0.0:
                        bad(gmask, "is empty (all black): it would keep nothing of the garment")
                except ValueError as e:
                    bad(gmask, str(e))
    _check_caption(sample.caption, bad)
    return problems


def validate_garment_dataset(root: str, slots: Sequence[str], workers: Optional[int] = None) -> Report:
    slots = parse_slots(slots)
    samples, report = garment_samples(root, slots)
    results = _check_samples(samples, lambda s: check_garment_sample(s, slots, root), workers or _default_workers())
    for sample, problems in zip(samples, results):
        if problems:
            report.errors.extend(problems)
        else:
            report.samples.append(sample.name)
            if not read_caption(sample.caption):
                report.warnings.append(Problem(sample.name, _rel(sample.caption, root), "empty caption"))
    return report
