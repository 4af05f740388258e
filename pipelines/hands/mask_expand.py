"""Per-step keep masks of sequential mask expansion (paper III-D) and its two baselines (paper IV-E).

Everything here is on the latent grid and comfy-free. For T sampling steps, the first ``T - unmasked`` steps
are masked and the last ``unmasked`` (2 in the paper) run on the whole latent. For ``sequential expansion``
the keep mask of masked step i is the hand mask dilated by a disk of radius r_i, r_0 = the maximum, shrinking
monotonically to r = 0 (the original mask) at the last masked step; ``naive`` keeps the original mask at every
masked step; ``bounding box`` keeps the bounding box of every connected part of the mask. Dilation is a
grayscale (max) dilation with a Euclidean disk, so a soft mask stays soft and a binary one stays binary.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...attention.labels import Labeled


class Blending(Labeled):
    """How the kept hands meet the outpainted body (the node's combo labels, saved in workflows)."""

    SEQUENTIAL = "sequential expansion"  # the paper's method
    NAIVE = "naive"  # baseline: the original mask at every masked step
    BOUNDING_BOX = "bounding box"  # baseline: each part's bounding box


BLENDINGS: tuple[str, ...] = Blending.labels()
SCHEDULES = ("linear", "cosine", "quadratic")


def expansion_radii(masked_steps: int, max_radius: float, schedule: str = "linear") -> list[float]:
    """Radius per masked step: max_radius at step 0, 0 at the last; monotonically non-increasing."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if max_radius < 0:
        raise ValueError(f"maximum expansion must be >= 0, got {max_radius}")
    if masked_steps <= 0:
        return []
    if masked_steps == 1:
        return [0.0]
    out = []
    for i in range(masked_steps):
        t = i / (masked_steps - 1)
        f = {"linear": 1.0 - t, "cosine": 0.5 * (1.0 + math.cos(math.pi * t)), "quadratic": (1.0 - t) ** 2}[schedule]
        out.append(max_radius * f)
    out[-1] = 0.0
    return out


def disk_offsets(radius: float) -> list[tuple[int, int]]:
    r = int(math.floor(radius))
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= radius * radius]


def dilate(mask: Tensor, radius: float) -> Tensor:
    """Grayscale dilation of [B, 1, h, w] by a Euclidean disk of the given radius (grid cells)."""
    if radius < 1.0:
        return mask.clone()
    r = int(math.floor(radius))
    padded = F.pad(mask, (r, r, r, r))
    h, w = mask.shape[-2:]
    out = mask.clone()
    for dy, dx in disk_offsets(radius):
        out = torch.maximum(out, padded[..., r + dy:r + dy + h, r + dx:r + dx + w])
    return out


def component_boxes(mask: Tensor, threshold: float = 0.0) -> Tensor:
    """[B, 1, h, w] -> binary mask of the bounding box of every 8-connected part of ``mask > threshold``."""
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        on = mask[b, 0] > threshold
        if not on.any():
            continue
        h, w = on.shape
        labels = torch.where(on, torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w), torch.zeros(h, w))
        while True:  # propagate the largest label through each component (8-neighbourhood)
            grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * on
            if torch.equal(grown, labels):
                break
            labels = grown
        for label in labels.unique():
            if label == 0:
                continue
            ys, xs = torch.nonzero(labels == label, as_tuple=True)
            out[b, 0, int(ys.min()):int(ys.max()) + 1, int(xs.min()):int(xs.max()) + 1] = 1.0
    return out


def keep_schedule(mask: Tensor, steps: int, unmasked_last: int = 2, max_radius: float = 8.0,
                  blending: Blending = Blending.SEQUENTIAL, schedule: str = "linear") -> list[Optional[Tensor]]:
    """One keep mask ([B, 1, h, w], 1 = keep the canvas) per step; None for the unmasked final steps."""
    blending = Blending.from_label(blending, "blending")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if unmasked_last < 0:
        raise ValueError(f"unmasked final steps must be >= 0, got {unmasked_last}")
    masked = max(steps - unmasked_last, 0)
    if blending == Blending.SEQUENTIAL:
        cache: dict[float, Tensor] = {}
        keeps = []
        for r in expansion_radii(masked, max_radius, schedule):
            if r not in cache:
                cache[r] = dilate(mask, r)
            keeps.append(cache[r])
    elif blending == Blending.NAIVE:
        keeps = [mask] * masked
    else:
        keeps = [component_boxes(mask)] * masked
    return keeps + [None] * (steps - masked)


def step_index(sigmas: Tensor, sigma: float) -> int:
    """Which step of the schedule ``sigmas`` (T + 1 values, decreasing) a model call at ``sigma`` belongs to.

    A call at the schedule's sigma_i is step i; a call between sigma_i and sigma_(i+1) (second-order and
    ancestral samplers) belongs to step i, the step being taken. So the mask follows sigma, not a call count.
    """
    starts = sigmas[:-1].double()
    tol = 1e-5 * max(abs(float(sigma)), 1e-3)
    count = int((starts >= float(sigma) - tol).sum())
    return min(max(count - 1, 0), starts.shape[0] - 1)
