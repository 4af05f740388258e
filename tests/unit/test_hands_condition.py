"""Hand crops, inverse transform, the 11-channel condition, skeleton drawing and keypoint masks.

Expected values are computed by hand (Gaussians with math.exp at pixel centres, HSV colours with colorsys).
"""
from __future__ import annotations

import colorsys
import math

import pytest
import torch

from humanref.pipelines.hands.condition import (
    HandCrop,
    crop_image,
    hand_condition,
    hand_skeleton,
    keypoint_mask,
    paste,
    plan_crops,
)
from humanref.pipelines.hands.draw import HAND_EDGES, draw_body, keypoint_hand_mask
from humanref.pipelines.hands.keypoints import Person


def straight_hand(x0: float, y0: float, step: float = 10.0) -> torch.Tensor:
    """Wrist at (x0, y0); finger f (0 = thumb) points up from (x0 + (f - 2) * step, y0 - step), 4 joints."""
    pts = [(x0, y0, 1.0)]
    for f in range(5):
        for j in range(4):
            pts.append((x0 + (f - 2) * step, y0 - step * (j + 1), 1.0))
    return torch.tensor(pts, dtype=torch.float64)


def person(left=None, right=None) -> Person:
    return Person(torch.zeros(18, 3, dtype=torch.float64), left, right)


IDENTITY = HandCrop(0, 0, 64, 64, ("left",))  # crop == canvas: crop pixels are canvas pixels


def test_finger_channels_land_on_the_right_fingers():
    left = straight_hand(32.5, 50.5, step=8.0)  # every keypoint on a pixel centre
    sigma = 2.0
    cond = hand_condition(person(left), IDENTITY, sigma=sigma)
    assert cond.shape == (11, 64, 64) and cond.dtype == torch.float32
    g = lambda d2: math.exp(-d2 / (2 * sigma * sigma))  # noqa: E731
    for f in range(5):
        tip = left[4 * f + 4]
        r, c = int(tip[1]), int(tip[0])
        assert cond[f, r, c].item() == pytest.approx(1.0)  # this finger's tip
        for other in range(5):
            if other != f:  # the other fingers' channels at this tip: their nearest joint is 8*|f-other| away
                assert cond[other, r, c].item() == pytest.approx(g((8.0 * abs(f - other)) ** 2), abs=1e-6)
        assert cond[f, 50, 32].item() == pytest.approx(1.0)  # the wrist is in every finger channel
    assert cond[5:].abs().max() == 0  # no right hand
    assert cond[10].abs().max() == 0  # no mask given


def test_right_hand_goes_to_channels_5_to_9_and_mask_channel_10():
    right = straight_hand(20.5, 40.5, step=6.0)
    mask = torch.zeros(64, 64)
    mask[3, 4] = 1.0
    cond = hand_condition(person(None, right), HandCrop(0, 0, 64, 64, ("right",)), sigma=1.0, mask=mask)
    assert cond[:5].abs().max() == 0
    assert cond[5 + 4, int(right[20, 1]), int(right[20, 0])] == pytest.approx(1.0)  # right pinky tip
    assert torch.equal(cond[10], mask)


def test_crop_plan_one_or_two_crops():
    near = person(straight_hand(100, 100), straight_hand(130, 100))
    (crop,) = plan_crops(near, size=64, crop_scale=1.5)
    assert crop.hands == ("left", "right")
    # box of both hands: x 80..150, y 60..100 -> side round(70 * 1.5) = 105, centred on (115, 80)
    assert (crop.side, crop.x0, crop.y0) == (105, int(round(115 - 52.5)), int(round(80 - 52.5)))
    far = person(straight_hand(100, 100), straight_hand(400, 300))
    crops = plan_crops(far, size=64)
    assert [c.hands for c in crops] == [("left",), ("right",)]
    with pytest.raises(ValueError, match="no hands"):
        plan_crops(person())


def test_keypoint_round_trip_is_exact():
    crop = HandCrop(37, -12, 90, 512, ("left",))
    pts = straight_hand(60.3, 40.7)
    assert torch.allclose(crop.to_canvas(crop.to_crop(pts)), pts, atol=1e-9)
    assert crop.to_crop(pts)[0, :2].tolist() == pytest.approx([(60.3 - 37) * 512 / 90, (40.7 + 12) * 512 / 90])


def test_image_crop_and_paste_round_trip_within_one_pixel():
    """A dot drawn at a keypoint's crop position lands, after paste, within one pixel of the keypoint."""
    crop = HandCrop(40, 25, 96, 512, ("left",))
    canvas = torch.zeros(160, 200, 3)
    for x, y in ((61.5, 40.5), (100.2, 90.9), (131.0, 115.0)):
        p = crop.to_crop(torch.tensor([[x, y, 1.0]], dtype=torch.float64))[0]
        patch = torch.zeros(512, 512, 3)
        alpha = torch.zeros(512, 512)
        r, c = int(p[1]), int(p[0])
        alpha[r - 8:r + 8, c - 8:c + 8] = 1.0
        patch[r - 8:r + 8, c - 8:c + 8] = 1.0
        _, a = paste(canvas, patch, alpha, crop)
        ys, xs = torch.nonzero(a > 0, as_tuple=True)
        w = a[ys, xs]
        cy = float((ys.double() + 0.5).mul(w).sum() / w.sum())
        cx = float((xs.double() + 0.5).mul(w).sum() / w.sum())
        assert abs(cx - x) <= 1.0 and abs(cy - y) <= 1.0, (cx, cy, x, y)


def test_crop_image_pads_outside_and_paste_clips():
    image = torch.rand(50, 60, 3)
    crop = HandCrop(-10, 30, 40, 40, ("left",))  # scale 1: no resampling
    out = crop_image(image, crop)
    assert torch.equal(out[:20, 10:], image[30:50, 0:30])  # inside the canvas
    assert out[:, :10].abs().max() == 0 and out[20:].abs().max() == 0  # padding
    patch, alpha = paste(torch.zeros(50, 60, 3), out, torch.ones(40, 40), crop)
    assert torch.equal(patch[30:50, 0:30], image[30:50, 0:30])
    assert alpha[30:50, 0:30].min() == 1 and alpha[:30].max() == 0 and alpha[:, 30:].max() == 0


def test_hands_only_skeleton_colours():
    left = straight_hand(32.5, 50.5, step=8.0)
    img = hand_skeleton(person(left), IDENTITY)  # 64 px crop: lines 0.5 px wide, joints radius 1
    assert img.shape == (64, 64, 3)
    blue = torch.tensor([0.0, 0.0, 1.0])
    assert torch.equal(img[50, 32], blue)  # the wrist joint
    for e, (i, j) in enumerate(HAND_EDGES):  # midpoint of each bone: the edge's HSV colour
        mid = (left[i, :2] + left[j, :2]) / 2
        if e % 4 == 0:  # wrist-to-base bones are diagonal; check the straight finger bones only
            continue
        expected = torch.tensor(colorsys.hsv_to_rgb(e / 20, 1.0, 1.0), dtype=torch.float32)
        assert torch.allclose(img[int(mid[1]), int(mid[0])], expected), e
    assert img[5, 5].abs().max() == 0  # background black


def test_keypoint_mask_capsules_and_dilation():
    pts = torch.zeros(21, 3, dtype=torch.float64)
    pts[0] = torch.tensor([10.5, 30.5, 1.0])
    pts[9] = torch.tensor([10.5, 10.5, 1.0])  # one bone (wrist-middle base), vertical, 20 px long
    pts[10] = torch.tensor([10.5, 10.5, 1.0])  # a zero-length bone, no effect
    # finger_width x hand scale (diagonal 20) = 1.4, raised to the 1.5 px minimum
    m = keypoint_hand_mask(pts, 40, 40, finger_width=0.07, dilation=0.0)
    assert m[20, 10] == 1 and m[20, 11] == 1 and m[20, 12] == 0  # |11.5 - 10.5| = 1 <= 1.5 < 2
    m = keypoint_hand_mask(pts, 40, 40, finger_width=0.07, dilation=4.0)  # radius 5.5
    assert m[20, 15] == 1 and m[20, 16] == 0 and m[20, 5] == 1 and m[20, 4] == 0
    assert m[30 + 5, 10] == 1 and m[30 + 6, 10] == 0  # the capsule's round end
    assert keypoint_hand_mask(None, 8, 8).abs().max() == 0


def test_keypoint_mask_fills_the_palm():
    left = straight_hand(32.5, 50.5, step=8.0)
    m = keypoint_mask(person(left), IDENTITY, dilation=0.0)
    assert m[46, 33] == 1  # inside the hull of the wrist and the finger bases, between bones
    assert m[5, 60] == 0


def test_body_drawing_limb_colour():
    body = torch.zeros(18, 3, dtype=torch.float64)
    body[1] = torch.tensor([20.5, 20.5, 1.0])  # neck
    body[2] = torch.tensor([40.5, 20.5, 1.0])  # right shoulder: limb (1, 2) is the first, colour (255, 0, 0)
    img = draw_body(torch.zeros(40, 60, 3), body)
    assert torch.allclose(img[20, 30], torch.tensor([0.6, 0.0, 0.0]))
    assert torch.allclose(img[20, 40], torch.tensor([1.0, 170 / 255, 0.0]))  # joint k in colour k, full
