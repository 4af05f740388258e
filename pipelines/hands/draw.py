"""Rasterising OpenPose skeletons and keypoint hand masks in pure torch (no OpenCV).

Colours and edges follow the OpenPose drawing of comfyui_controlnet_aux, which OpenPose ControlNets were
trained on: hand bones in HSV hue ``edge / 20`` at full saturation, hand joints blue, body limbs in the 18
OpenPose colours at 60 % brightness, body joints in full colour. Shapes are drawn by distance tests on pixel
centres, so a drawing is deterministic and exactly reproducible.
"""
from __future__ import annotations

import colorsys
from typing import Optional

import torch
from torch import Tensor

from .keypoints import FINGERS, valid

HAND_EDGES: tuple[tuple[int, int], ...] = tuple(
    (a, b) for _, joints in FINGERS for a, b in zip((0,) + joints[:-1], joints))
HAND_EDGE_COLORS: tuple[tuple[float, float, float], ...] = tuple(
    colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0) for i in range(len(HAND_EDGES)))
HAND_POINT_COLOR = (0.0, 0.0, 1.0)
BODY_LIMBS: tuple[tuple[int, int], ...] = (  # 0-based COCO-18 pairs, OpenPose drawing order
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
BODY_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
PALM = (0, 1, 5, 9, 13, 17)  # wrist and the five finger bases


def pixel_grid(height: int, width: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates (x, y), each [H, W]: pixel (i, j) covers [j, j+1) x [i, i+1)."""
    ys = torch.arange(height, dtype=dtype) + 0.5
    xs = torch.arange(width, dtype=dtype) + 0.5
    return xs.view(1, -1).expand(height, width), ys.view(-1, 1).expand(height, width)


def segment_distance(x: Tensor, y: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Distance of every pixel centre to the segment a-b (points [2])."""
    d = b - a
    length2 = float((d * d).sum())
    if length2 == 0.0:
        return torch.hypot(x - a[0], y - a[1])
    t = (((x - a[0]) * d[0] + (y - a[1]) * d[1]) / length2).clamp(0.0, 1.0)
    return torch.hypot(x - (a[0] + t * d[0]), y - (a[1] + t * d[1]))


def convex_hull(points: Tensor) -> Tensor:
    """Andrew's monotone chain; [N, 2] -> [M, 2] counter-clockwise (in image coordinates), no repeats."""
    pts = sorted({(float(p[0]), float(p[1])) for p in points})
    if len(pts) <= 2:
        return torch.tensor(pts, dtype=torch.float64).reshape(-1, 2)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return torch.tensor(lower[:-1] + upper[:-1], dtype=torch.float64)


def inside_convex(x: Tensor, y: Tensor, hull: Tensor) -> Tensor:
    """Pixel centres inside (or on) a convex polygon given in monotone-chain order."""
    if hull.shape[0] < 3:
        return torch.zeros_like(x, dtype=torch.bool)
    inside = torch.ones_like(x, dtype=torch.bool)
    for i in range(hull.shape[0]):
        a, b = hull[i], hull[(i + 1) % hull.shape[0]]
        inside &= (b[0] - a[0]) * (y - a[1]) - (b[1] - a[1]) * (x - a[0]) >= 0
    return inside


def _paint(canvas: Tensor, where: Tensor, color: tuple[float, float, float]) -> None:
    canvas[where] = torch.tensor(color, dtype=canvas.dtype)


def draw_hand(canvas: Tensor, points: Optional[Tensor], line_width: float, point_radius: float) -> Tensor:
    """Draw one hand ([21, 3] in canvas pixels) onto canvas [H, W, 3] (0..1) in place; returns canvas."""
    if points is None:
        return canvas
    h, w = canvas.shape[:2]
    x, y = pixel_grid(h, w)
    ok = valid(points)
    for (i, j), color in zip(HAND_EDGES, HAND_EDGE_COLORS):
        if ok[i] and ok[j]:
            _paint(canvas, segment_distance(x, y, points[i, :2], points[j, :2]) <= line_width / 2, color)
    for p in points[ok]:
        _paint(canvas, torch.hypot(x - p[0], y - p[1]) <= point_radius, HAND_POINT_COLOR)
    return canvas


def draw_body(canvas: Tensor, body: Tensor, stick_width: float = 4.0, point_radius: float = 4.0) -> Tensor:
    """OpenPose body drawing: limbs as ellipses (half-width stick_width) at 60 % colour, joints on top."""
    h, w = canvas.shape[:2]
    x, y = pixel_grid(h, w)
    ok = valid(body)
    for (i, j), color in zip(BODY_LIMBS, BODY_COLORS):
        if not (ok[i] and ok[j]):
            continue
        a, b = body[i, :2], body[j, :2]
        c = (a + b) / 2
        half = float(torch.linalg.norm(b - a)) / 2
        if half <= 0:
            continue
        u = (b - a) / (2 * half)
        along = (x - c[0]) * u[0] + (y - c[1]) * u[1]
        across = -(x - c[0]) * u[1] + (y - c[1]) * u[0]
        inside = (along / half) ** 2 + (across / stick_width) ** 2 <= 1.0
        _paint(canvas, inside, tuple(0.6 * v / 255.0 for v in color))
    for k, color in enumerate(BODY_COLORS):
        if ok[k]:
            p = body[k]
            _paint(canvas, torch.hypot(x - p[0], y - p[1]) <= point_radius, tuple(v / 255.0 for v in color))
    return canvas


def hand_scale(points: Tensor) -> float:
    """A length that grows with the hand: the diagonal of its valid keypoints' bounding box."""
    p = points[valid(points), :2]
    if p.shape[0] < 2:
        return 0.0
    return float(torch.linalg.norm(p.max(dim=0).values - p.min(dim=0).values))


def keypoint_hand_mask(points: Optional[Tensor], height: int, width: int, finger_width: float = 0.07,
                       dilation: float = 0.0) -> Tensor:
    """Approximate hand silhouette [H, W] in {0, 1}: finger capsules + palm hull, dilated by ``dilation`` px.

    Every bone (wrist to finger base, and along each finger) is a capsule of radius
    ``finger_width * hand_scale`` (at least 1.5 px); the palm is the convex hull of the wrist and the five
    finger bases. Dilation is exact (Euclidean): capsule radii grow by it and the hull's edges become capsules.
    """
    x, y = pixel_grid(height, width)
    mask = torch.zeros(height, width, dtype=torch.bool)
    if points is None:
        return mask.float()
    ok = valid(points)
    radius = max(1.5, finger_width * hand_scale(points)) + max(dilation, 0.0)
    for i, j in HAND_EDGES:
        if ok[i] and ok[j]:
            mask |= segment_distance(x, y, points[i, :2], points[j, :2]) <= radius
    for k in range(points.shape[0]):  # isolated valid joints still cover their surroundings
        if ok[k]:
            mask |= torch.hypot(x - points[k, 0], y - points[k, 1]) <= radius
    palm = [k for k in PALM if ok[k]]
    if len(palm) >= 3:
        hull = convex_hull(points[palm, :2])
        mask |= inside_convex(x, y, hull)
        if dilation > 0:
            for i in range(hull.shape[0]):
                mask |= segment_distance(x, y, hull[i], hull[(i + 1) % hull.shape[0]]) <= dilation
    return mask.float()


def finger_heatmaps(points: Optional[Tensor], size: int, sigma: float) -> Tensor:
    """[5, size, size]: one channel per finger (thumb..pinky), max of Gaussians (peak 1) at its joints.

    Each finger channel holds its four joints and the wrist: the wrist anchors every finger to the palm, so a
    finger channel alone says where the finger starts and which way it points. Missing joints are left out;
    a missing hand gives zeros.
    """
    out = torch.zeros(5, size, size, dtype=torch.float64)
    if points is None:
        return out
    x, y = pixel_grid(size, size)
    ok = valid(points)
    for c, (_, joints) in enumerate(FINGERS):
        for k in (0,) + joints:
            if ok[k]:
                d2 = (x - points[k, 0]) ** 2 + (y - points[k, 1]) ** 2
                out[c] = torch.maximum(out[c], torch.exp(-d2 / (2 * sigma * sigma)))
    return out


def default_line_width(size: int) -> tuple[float, float]:
    """Hands-only skeleton stroke widths for a crop of side ``size``: 4 px lines and 8 px joints at 512."""
    s = size / 256.0
    return 2.0 * s, 4.0 * s

