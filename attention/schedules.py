"""Reference strength over the steps (ComfyUI-Advanced-ControlNet's timestep keyframes, IPAdapter's weight
types, as one curve): a factor in 0..1 of the progress p through the active range (start_percent = 0,
end_percent = 1) that multiplies the patch's strength at each step."""
from __future__ import annotations

from .labels import Labeled


class WeightType(Labeled):
    CONSTANT = "constant"  # the same strength at every active step
    LINEAR_IN = "linear in"  # 0 at start_percent, rising evenly to the full strength at end_percent
    LINEAR_OUT = "linear out"  # the full strength at start_percent, falling evenly to 0 at end_percent
    EASE_IN = "ease in"  # like linear in along a smoothstep: slow at both ends
    EASE_OUT = "ease out"  # like linear out along a smoothstep


WEIGHT_TYPES: tuple[str, ...] = WeightType.labels()


def smoothstep(p: float) -> float:
    return p * p * (3.0 - 2.0 * p)


def weight_factor(kind: WeightType, p: float) -> float:
    """The factor at progress ``p`` (clamped to 0..1) through the active range."""
    p = min(1.0, max(0.0, p))
    if kind == WeightType.CONSTANT:
        return 1.0
    if kind == WeightType.LINEAR_IN:
        return p
    if kind == WeightType.LINEAR_OUT:
        return 1.0 - p
    if kind == WeightType.EASE_IN:
        return smoothstep(p)
    if kind == WeightType.EASE_OUT:
        return 1.0 - smoothstep(p)
    raise ValueError(f"unknown weight type {kind!r}; expected one of {WEIGHT_TYPES}")
