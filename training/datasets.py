"""What the dataset folders of both trainers share: the readers, the problem report and the folder checks.

Files of one sample share a name (the file stem) across folders; images may be PNG, JPEG, WebP or BMP. Each
trainer's folder format and validator live next to its dataset (``training.hands.data``,
``training.anydressing.data``): every file a sample needs exists, decodes, has the right size and content; the
report lists every problem at once.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence, TypeVar

import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_SIDE = 32


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


# ---- folder checks (both validators) ----------------------------------------------------------------------

Bad = Callable[[str, str], None]  # reports (path, message) for the sample being checked


class Sample(Protocol):
    name: str
    caption: str


S = TypeVar("S", bound=Sample)


def relative(path: str, root: str) -> str:
    return os.path.relpath(path, root)


def index_folder(folder: str, root: str, report: Report, extensions: Sequence[str]) -> dict[str, str]:
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
            report.warnings.append(Problem("", relative(path, root),
                                           f"ignored (not one of {', '.join(extensions)})"))
            continue
        if stem in found:
            report.errors.append(Problem(stem, relative(path, root), f"a second file for sample {stem!r} (also "
                                                                     f"{relative(found[stem], root)}): keep one"))
            continue
        found[stem] = path
    return found


def require_folder(root: str, name: str, report: Report, what: str) -> bool:
    if not os.path.isdir(os.path.join(root, name)):
        report.errors.append(Problem("", name + "/", f"missing folder ({what})"))
        return False
    return True


def orphans(index: dict[str, str], names: set[str], root: str, report: Report, what: str) -> None:
    """Warns about files of an index whose sample has no main image."""
    for stem, path in index.items():
        if stem not in names:
            report.warnings.append(Problem(stem, relative(path, root), f"{what} without a matching image (ignored)"))


def image_size(path: str, bad: Bad) -> Optional[tuple[int, int]]:
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


def check_mask(path: str, size: Optional[tuple[int, int]], of: str, missing: str, empty: str, bad: Bad) -> None:
    """Reports a mask file that is missing, unreadable, not the size of ``of`` (when known) or all black."""
    if not os.path.isfile(path):
        bad(path, missing)
        return
    try:
        m = read_mask(path)
    except ValueError as e:
        bad(path, str(e))
        return
    if size is not None and (m.shape[1], m.shape[0]) != size:
        bad(path, f"is {m.shape[1]}x{m.shape[0]} but {of} is {size[0]}x{size[1]}")
    elif float(m.max()) <= 0.0:
        bad(path, f"is empty (all black): {empty}")


def check_caption(path: str, bad: Bad) -> None:
    """Reports a missing or unreadable caption file."""
    if not os.path.isfile(path):
        bad(path, "missing caption (captions/<name>.txt)")
        return
    try:
        read_caption(path)
    except ValueError as e:
        bad(path, str(e))


def check_samples(samples: Sequence[S], check: Callable[[S], list[Problem]], report: Report,
                  workers: Optional[int] = None) -> Report:
    """Checks every sample (in threads for larger sets) into the report: its problems, or it is usable."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if workers <= 1 or len(samples) < 8:
        results = [check(s) for s in samples]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(check, samples))
    for sample, problems in zip(samples, results):
        if problems:
            report.errors.extend(problems)
        else:
            report.samples.append(sample.name)
            if not read_caption(sample.caption):
                report.warnings.append(Problem(sample.name, relative(sample.caption, report.root), "empty caption"))
    return report
