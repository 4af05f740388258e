"""Pose keypoints in, one clean structure out: comfyui_controlnet_aux POSE_KEYPOINT or an OpenPose JSON file.

Accepted inputs (all parsed into :class:`PoseFrame`, coordinates in canvas pixels):

- comfyui_controlnet_aux ``POSE_KEYPOINT`` (DWPose / OpenPose estimators): a list of frames
  ``{"people": [{"pose_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d", ...}],
  "canvas_width", "canvas_height"}``, each keypoint list flat ``[x, y, c, ...]`` with x, y **normalised to
  0..1** (the aux multiplies by the canvas size when drawing); missing points are ``[0, 0, 0]`` or negative.
- OpenPose's own JSON (``{"version", "people": [...]}``): x, y in **pixels**, no canvas size (give width and
  height), body in BODY_25 or COCO-18 order; BODY_25 is reduced to COCO-18.
- A JSON string or a single frame dict of either; nested ``[[x, y, c], ...]`` lists are accepted too.

``coordinates="auto"`` decides per frame: normalised when every valid coordinate is within -1..2 (a pose
reaching up to one image size beyond the border; a body that fits into two pixels is not a real pose), pixels
otherwise. A point is missing when its confidence is below ``min_confidence``, when it is exactly (0, 0) (the
aux's and OpenPose's "not found") or exactly (-1, -1) (DWPose's "not visible"), or not finite. Points outside
the canvas, on any side, stay valid: crops reaching over the border are zero-padded, pasted parts are clipped.
A hand that lies entirely outside the canvas, or whose points all sit on one spot, cannot be drawn: it is
dropped with a warning the user sees, and an error says so when no hand is left.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..notices import warn

BODY_POINTS = 18  # OpenPose COCO-18: 0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-13 legs, 14-17 eyes/ears
HAND_POINTS = 21  # 0 wrist, then 4 joints per finger (MCP, PIP, DIP, tip)
FINGERS: tuple[tuple[str, tuple[int, int, int, int]], ...] = (
    ("thumb", (1, 2, 3, 4)), ("index", (5, 6, 7, 8)), ("middle", (9, 10, 11, 12)),
    ("ring", (13, 14, 15, 16)), ("pinky", (17, 18, 19, 20)),
)
HANDS = ("left", "right")  # the person's own left and right (OpenPose's hand_left / hand_right)
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
COORDINATES = ("auto", "normalized", "pixels")
MIN_HAND_POINTS = 5  # a hand with fewer valid points is treated as missing
MIN_HAND_SPAN = 4.0  # pixels: a hand whose points all lie closer together than this is a degenerate detection
NORMALIZED_RANGE = (-1.0, 2.0)  # "auto": every coordinate in this range means fractions of the image


@dataclass(frozen=True, eq=False)
class Person:
    """Keypoints of one person, [N, 3] = (x px, y px, confidence); confidence 0 marks a missing point."""

    body: Tensor  # [18, 3]
    left_hand: Optional[Tensor]  # [21, 3] or None when the hand is missing
    right_hand: Optional[Tensor]

    def hand(self, side: str) -> Optional[Tensor]:
        return self.left_hand if side == "left" else self.right_hand


@dataclass(frozen=True, eq=False)
class PoseFrame:
    width: int
    height: int
    people: tuple[Person, ...]


def valid(points: Tensor) -> Tensor:
    """[N, 3] -> [N] bool: which points are present."""
    return points[:, 2] > 0


def _points(raw: Any, count: Optional[int], name: str) -> Optional[Tensor]:
    if raw is None:
        return None
    if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], (list, tuple)):
        raw = [v for p in raw for v in (list(p) + [1.0] * (3 - len(p)))[:3]]
    try:
        flat = torch.tensor([float(v) for v in raw], dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"pose: {name} must be a list of numbers [x, y, confidence, ...]: {e}") from None
    if flat.numel() == 0:
        return None
    if flat.numel() % 3:
        raise ValueError(f"pose: {name} has {flat.numel()} numbers, not a multiple of 3 (x, y, confidence)")
    pts = flat.reshape(-1, 3)
    if count is not None and pts.shape[0] != count:
        raise ValueError(f"pose: {name} has {pts.shape[0]} keypoints, expected {count}")
    return pts


def _clean(points: Tensor, min_confidence: float) -> Tensor:
    pts = points.clone()
    xy = pts[:, :2]
    missing = (pts[:, 2] < min_confidence) | (xy == 0).all(dim=1) | (xy == -1).all(dim=1)
    missing |= ~torch.isfinite(pts).all(dim=1)
    pts[missing] = 0.0
    pts[~missing, 2] = pts[~missing, 2].clamp(min=1e-6)
    return pts


def _frames(data: Any) -> list[dict]:
    if isinstance(data, str):
        text = data.strip()
        if not text:
            return []
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"pose_json is not valid JSON: {e}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, (list, tuple)) or not all(isinstance(f, dict) for f in data):
        raise ValueError("pose: expected a POSE_KEYPOINT list of frames or an OpenPose JSON object with 'people'")
    for f in data:
        if "people" not in f:
            raise ValueError("pose: a frame has no 'people' list (not an OpenPose / POSE_KEYPOINT frame)")
    return list(data)


def parse_pose(data: Any, coordinates: str = "auto", min_confidence: float = 0.3, width: int = 0,
               height: int = 0) -> list[PoseFrame]:
    """POSE_KEYPOINT (list of frames), one frame dict, or JSON text -> frames in pixel coordinates.

    width/height (0 = from the pose) give the canvas size; they are required for OpenPose files, which carry
    none. Normalised poses are scaled by the canvas size.
    """
    if coordinates not in COORDINATES:
        raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")
    frames = []
    for i, f in enumerate(_frames(data)):
        w = int(width or f.get("canvas_width") or 0)
        h = int(height or f.get("canvas_height") or 0)
        if w <= 0 or h <= 0:
            raise ValueError(f"pose frame {i} has no canvas size (canvas_width/canvas_height): set width and "
                             "height (OpenPose JSON files do not record the image size)")
        raw_people = []
        for j, p in enumerate(f["people"] or []):
            name = f"frame {i} person {j}"
            body = _points(p.get("pose_keypoints_2d"), None, f"{name} pose_keypoints_2d")
            if body is not None and body.shape[0] == 25:
                body = body[list(BODY25_TO_COCO18)]
            elif body is not None and body.shape[0] != BODY_POINTS:
                raise ValueError(f"pose: {name} pose_keypoints_2d has {body.shape[0]} keypoints, expected 18 "
                                 "(COCO-18) or 25 (BODY_25)")
            left = _points(p.get("hand_left_keypoints_2d"), HAND_POINTS, f"{name} hand_left_keypoints_2d")
            right = _points(p.get("hand_right_keypoints_2d"), HAND_POINTS, f"{name} hand_right_keypoints_2d")
            raw_people.append([_clean(x, min_confidence) if x is not None else None for x in (body, left, right)])
        scale = _scale(raw_people, coordinates, w, h)
        people = []
        for j, (body, left, right) in enumerate(raw_people):
            body = torch.zeros(BODY_POINTS, 3, dtype=torch.float64) if body is None else body
            hands = []
            for side, pts in (("left", left), ("right", right)):
                if pts is not None:
                    pts = pts.clone()
                    pts[:, :2] *= scale
                    if int(valid(pts).sum()) < MIN_HAND_POINTS:
                        if valid(pts).any():
                            warn(f"frame {i} person {j}: the {side} hand has only {int(valid(pts).sum())} "
                                 f"keypoints above min_confidence (fewer than {MIN_HAND_POINTS}); it is left out "
                                 "(lower min_confidence to keep it)")
                        pts = None
                hands.append(pts)
            body = body.clone()
            body[:, :2] *= scale
            people.append(Person(body, hands[0], hands[1]))
        frames.append(PoseFrame(w, h, tuple(people)))
    if not frames:
        raise ValueError("pose: no frames (an empty POSE_KEYPOINT list or empty JSON)")
    return frames


def _scale(people: list[list[Optional[Tensor]]], coordinates: str, w: int, h: int) -> Tensor:
    if coordinates == "pixels":
        return torch.tensor([1.0, 1.0], dtype=torch.float64)
    if coordinates == "auto":
        coords = [x[valid(x)][:, :2] for group in people for x in group if x is not None]
        coords = torch.cat(coords) if coords else torch.zeros(0, 2, dtype=torch.float64)
        lo, hi = NORMALIZED_RANGE
        if coords.numel() and (float(coords.max()) > hi or float(coords.min()) < lo):
            return torch.tensor([1.0, 1.0], dtype=torch.float64)
    return torch.tensor([float(w), float(h)], dtype=torch.float64)


def select_person(frames: Sequence[PoseFrame], frame: int = 0, person: int = 0) -> tuple[PoseFrame, Person]:
    """The person to generate hands for, with clear errors for empty poses."""
    if not 0 <= frame < len(frames):
        raise ValueError(f"frame {frame} does not exist: the pose has {len(frames)} frame(s)")
    f = frames[frame]
    if not f.people:
        raise ValueError(f"pose frame {frame} has no people: nothing to generate hands for")
    if not 0 <= person < len(f.people):
        raise ValueError(f"person {person} does not exist: pose frame {frame} has {len(f.people)} people")
    p = f.people[person]
    if p.left_hand is None and p.right_hand is None:
        raise ValueError(f"no hands in the pose (frame {frame}, person {person}): the pose needs hand keypoints "
                         "(DWPose or OpenPose with detect_hand enabled) with at least "
                         f"{MIN_HAND_POINTS} confident points per hand")
    return f, drawable_hands(f, p, f"frame {frame} person {person}")


def hand_problem(points: Tensor, width: int, height: int) -> Optional[str]:
    """Why a hand cannot be drawn (entirely outside the canvas, all points on one spot), or None."""
    p = points[valid(points), :2]
    lo, hi = p.min(dim=0).values, p.max(dim=0).values
    if float(hi[0]) < 0 or float(hi[1]) < 0 or float(lo[0]) >= width or float(lo[1]) >= height:
        return (f"lies entirely outside the {width}x{height} image (x {float(lo[0]):.0f}..{float(hi[0]):.0f}, "
                f"y {float(lo[1]):.0f}..{float(hi[1]):.0f} px)")
    if float((hi - lo).max()) < MIN_HAND_SPAN:
        return (f"has all its keypoints within {MIN_HAND_SPAN:g} px of ({float(lo[0]):.0f}, {float(lo[1]):.0f}): "
                "a degenerate detection, not a hand")
    return None


def drawable_hands(frame: PoseFrame, person: Person, name: str) -> Person:
    """``person`` without the hands that cannot be drawn (with a warning), or an error if none is left."""
    hands, problems = {}, []
    for side in HANDS:
        pts = person.hand(side)
        problem = None if pts is None else hand_problem(pts, frame.width, frame.height)
        if problem is not None:
            problems.append(f"the {side} hand {problem}")
            pts = None
        hands[side] = pts
    if hands["left"] is None and hands["right"] is None:
        raise ValueError(f"no hand of {name} can be drawn: {'; '.join(problems)}. Check that the pose belongs to "
                         "this image (coordinates: normalized or pixels; width and height)")
    for problem in problems:
        warn(f"{name}: {problem}; it is left out")
    return Person(person.body, hands["left"], hands["right"])
