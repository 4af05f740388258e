"""The likeness metrics: how far a sample's appearance moved toward the reference's, and whether its layout still
follows the prompt. All on cell images [3, 16, 16] (``figures.to_cells`` of a decoded picture, or the codec's
exact ``decode_cells`` of a latent), float64 for the statistics.

* background: the sample's own background colour, the per-channel median of the border ring of cells (a mode may
  tint the whole background, as AdaIN does; against the fixed grey a tinted background would be all figure). The
  figure covers at most 6 of the 60 ring cells (a right layout's arm in the last column, raised arms in the first
  row; never the last row or the first column), so the median is the background's even when the figure touches
  the border and a few stray cells land there;
* foreground: the cells whose colour differs from that background by more than ``FG_THRESHOLD`` in some channel
  (every figure colour differs from the untinted grey by >= 0.45, see ``figures.random_colour`` and ``SKIN``; a
  figure colour within the threshold of a tinted background is lost, as it is to the eye);
* appearance descriptor (11 numbers): the mean colour of the foreground cells in the shirt band (rows 4-9, where
  every layout has its torso) and in the trouser band (rows 10-15, its legs), the per-channel standard deviation
  in the shirt band (solid against striped), and the mean absolute colour step between vertically and between
  horizontally adjacent foreground cells of the shirt band (horizontal against vertical stripes);
* appearance distance: the Euclidean distance of two descriptors; *gap closed* of a sample = 1 - d(sample, ref)
  / d(baseline, ref), the baseline being the same seed and prompt sampled without a reference: 0 = no move, 1 =
  the reference's statistics exactly, < 0 = farther than without;
* layout: the IoU of the foreground with the prompt's silhouette, and whether that silhouette is the best match
  among the six layouts (layout accuracy); the IoU with the *reference's* silhouette shows layout copying.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import figures

FG_THRESHOLD = 0.25
SHIRT_ROWS = slice(4, 10)
TROUSER_ROWS = slice(10, 16)
DESCRIPTOR_SIZE = 11


def border(cells: Tensor) -> Tensor:
    """[3, H, W] -> [3, 2H + 2W - 4]: the ring of edge cells (first and last row, then first and last column
    without the corners)."""
    if cells.dim() != 3 or cells.shape[0] != 3 or min(cells.shape[1:]) < 3:
        raise ValueError(f"cells must be [3, H, W] with H, W >= 3, got {tuple(cells.shape)}")
    return torch.cat([cells[:, 0], cells[:, -1], cells[:, 1:-1, 0], cells[:, 1:-1, -1]], dim=1)


def background(cells: Tensor) -> Tensor:
    """[3, H, W] -> [3]: the per-channel median of the border ring (the mean of the two middle values for an even
    count, as ``statistics.median``), in the cells' floating dtype."""
    ring = border(cells)
    return (ring if ring.is_floating_point() else ring.double()).quantile(0.5, dim=1)


def foreground(cells: Tensor) -> Tensor:
    """[3, H, W] -> bool [H, W]: the cells that differ from the sample's own background (:func:`background`)
    by more than ``FG_THRESHOLD`` in some channel."""
    bg = background(cells).view(3, 1, 1)
    return (cells - bg).abs().amax(dim=0) > FG_THRESHOLD


def _band_mean(cells: Tensor, fg: Tensor, rows: slice) -> Tensor:
    sel = fg[rows]
    if not bool(sel.any()):
        return torch.full((3,), math.nan, dtype=torch.float64)
    return cells[:, rows][:, sel].mean(dim=1)


def _steps(cells: Tensor, fg: Tensor, dim: int) -> Tensor:
    """Mean |colour step| (mean over channels) between neighbours along ``dim`` (1: rows, 2: columns), both
    foreground; 0 when no such pair exists (a one-cell-wide band has no horizontal pairs)."""
    a = cells.narrow(dim, 0, cells.shape[dim] - 1)
    b = cells.narrow(dim, 1, cells.shape[dim] - 1)
    both = fg.narrow(dim - 1, 0, fg.shape[dim - 1] - 1) & fg.narrow(dim - 1, 1, fg.shape[dim - 1] - 1)
    if not bool(both.any()):
        return torch.zeros((), dtype=torch.float64)
    return (a - b).abs().mean(dim=0)[both].mean()


def descriptor(cells: Tensor, fg: Optional[Tensor] = None) -> Tensor:
    """The 11 appearance statistics of a cell image (NaN where the figure has no cell in a band)."""
    cells = cells.double()
    fg = foreground(cells) if fg is None else fg
    shirt_cells, shirt_fg = cells[:, SHIRT_ROWS], fg[SHIRT_ROWS]
    if bool(shirt_fg.any()):
        std = shirt_cells[:, shirt_fg].std(dim=1, unbiased=False)
        vertical, horizontal = _steps(shirt_cells, shirt_fg, 1), _steps(shirt_cells, shirt_fg, 2)
    else:
        std = torch.full((3,), math.nan, dtype=torch.float64)
        vertical = horizontal = torch.tensor(math.nan, dtype=torch.float64)
    return torch.cat([_band_mean(cells, fg, SHIRT_ROWS), _band_mean(cells, fg, TROUSER_ROWS), std,
                      vertical.view(1), horizontal.view(1)])


def distance(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b))


def gap_closed(sample: Tensor, baseline: Tensor, reference: Tensor) -> float:
    """1 - d(sample, ref) / d(baseline, ref) on descriptors; NaN when undefined (a descriptor with NaN, or a
    baseline that already matches the reference)."""
    d_base = distance(baseline, reference)
    d_row = distance(sample, reference)
    if not math.isfinite(d_base) or not math.isfinite(d_row) or d_base < 1e-6:
        return math.nan
    return 1.0 - d_row / d_base


def iou(a: Tensor, b: Tensor) -> float:
    union = int((a | b).sum())
    return float(int((a & b).sum()) / union) if union else 0.0


def best_layout(fg: Tensor) -> int:
    """Index of the layout whose silhouette has the highest IoU with ``fg`` (the first on a tie)."""
    scores = [iou(fg, figures.silhouette(layout)) for layout in figures.LAYOUTS]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def quartiles(values: Sequence[float]) -> dict:
    """Median, 25th and 75th percentile (inclusive method), mean and count of the finite values."""
    xs = sorted(v for v in values if math.isfinite(v))
    if not xs:
        return {"median": None, "q25": None, "q75": None, "mean": None, "n": 0}
    if len(xs) == 1:
        q25 = q75 = xs[0]
    else:
        q25, _, q75 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q25": q25, "q75": q75, "mean": statistics.fmean(xs), "n": len(xs)}
