"""Pose parsing: POSE_KEYPOINT (normalised) and OpenPose JSON (pixels), missing points, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from humanref.pipelines.hands.condition import plan_crops
from humanref.pipelines.hands.keypoints import parse_pose, select_person, valid
from humanref.pipelines.notices import collect


def flat(points):
    return [v for p in points for v in p]


def hand(x0=0.5, y0=0.5, step=0.01, conf=1.0):
    """21 keypoints on a little grid, normalised coordinates."""
    return flat([(x0 + (k % 5) * step, y0 + (k // 5) * step, conf) for k in range(21)])


def frame(**person):
    return {"people": [person], "canvas_width": 200, "canvas_height": 100}


def test_pose_keypoint_normalised_to_pixels():
    body = flat([(0.5, 0.25, 1.0)] + [(0.0, 0.0, 0.0)] * 17)
    frames = parse_pose([frame(pose_keypoints_2d=body, hand_left_keypoints_2d=hand())])
    p = frames[0].people[0]
    assert (frames[0].width, frames[0].height) == (200, 100)
    assert p.body[0].tolist() == [100.0, 25.0, 1.0]
    assert p.body[1].tolist() == [0.0, 0.0, 0.0]  # missing stays marked missing
    assert p.left_hand[6, :2].tolist() == pytest.approx([(0.5 + 0.01) * 200, (0.5 + 0.01) * 100])
    assert p.right_hand is None


def test_openpose_json_pixels_body25_needs_canvas_size():
    body25 = flat([(10.0 + k, 20.0 + k, 0.9) for k in range(25)])
    text = json.dumps({"version": 1.3, "people": [{"pose_keypoints_2d": body25,
                                                     "hand_right_keypoints_2d": hand(100, 50, 3)}]})
    with pytest.raises(ValueError, match="no canvas size"):
        parse_pose(text)
    p = parse_pose(text, width=640, height=480)[0].people[0]
    assert p.body.shape == (18, 3)
    assert p.body[8, :2].tolist() == [19.0, 29.0]  # COCO-18 right hip = BODY_25 point 9
    assert p.right_hand[1, :2].tolist() == [103.0, 50.0]  # pixels kept as pixels


def test_low_confidence_and_sentinels_are_missing_but_points_beyond_the_border_are_kept():
    pts = [(0.5, 0.5, 1.0)] * 21
    pts[3] = (0.6, 0.6, 0.1)  # below min_confidence
    pts[4] = (-1.0, -1.0, 1.0)  # DWPose's "not visible"
    pts[5] = (0.0, 0.0, 0.0)  # the aux's "not found"
    pts[6] = (-0.002, 0.3, 1.0)  # just left of the image: a real point
    p = parse_pose([frame(hand_left_keypoints_2d=flat(pts))], min_confidence=0.3)[0].people[0]
    for k in (3, 4, 5):
        assert p.left_hand[k].tolist() == [0, 0, 0]
    assert p.left_hand[6].tolist() == pytest.approx([-0.4, 30.0, 1.0])


HAND_POSE = Path(__file__).resolve().parents[2] / "workflows" / "inputs" / "hand_pose.json"


def shifted_example(dx: float, side: str = "left") -> list:
    """The hands workflow's pose with ``dx`` added to every x of one hand (the issue's repro: dx = -0.62)."""
    pose = json.loads(HAND_POSE.read_text())
    key = f"hand_{side}_keypoints_2d"
    pts = pose[0]["people"][0][key]
    pose[0]["people"][0][key] = [v + dx if i % 3 == 0 else v for i, v in enumerate(pts)]
    return pose


def test_a_hand_partly_beyond_the_left_border_is_kept_whole():
    original = parse_pose(json.loads(HAND_POSE.read_text()))[0]
    with collect() as warnings:
        f, p = select_person(parse_pose(shifted_example(-0.62)))
    assert warnings == []
    assert p.left_hand is not None and bool(valid(p.left_hand).all())
    x = p.left_hand[:, 0]
    assert float(x.min()) < 0 < float(x.max())  # reaches over the border
    # every point moved by exactly -0.62 of the width, none dropped or clamped
    expected = original.people[0].left_hand[:, 0] - 0.62 * f.width
    assert x.tolist() == pytest.approx(expected.tolist())
    crops = plan_crops(p, 64, 1.5)
    assert any(c.x0 < 0 and "left" in c.hands for c in crops)  # the crop reaches over the border (zero-padded)


def test_auto_keeps_fractions_that_reach_beyond_the_right_border():
    p = parse_pose(shifted_example(+0.7, "right"))[0].people[0]  # right hand x up to ~1.12 of the width
    assert float(p.right_hand[:, 0].max()) > 512  # read as fractions: over the right edge of the 512 px image


def test_a_hand_entirely_outside_is_left_out_with_a_warning_and_both_outside_is_an_error():
    with collect() as warnings:
        _, p = select_person(parse_pose(shifted_example(-0.9)))
    assert p.left_hand is None and p.right_hand is not None
    assert len(warnings) == 1 and "left hand lies entirely outside" in warnings[0]
    pose = shifted_example(-0.9)
    right = pose[0]["people"][0]["hand_right_keypoints_2d"]
    pose[0]["people"][0]["hand_right_keypoints_2d"] = [v + 1.5 if i % 3 == 0 else v for i, v in enumerate(right)]
    with pytest.raises(ValueError, match="no hand of frame 0 person 0 can be drawn.*left hand lies entirely "
                                         "outside.*right hand lies entirely outside"):
        select_person(parse_pose(pose))


def test_a_degenerate_hand_is_left_out_with_a_warning():
    pose = json.loads(HAND_POSE.read_text())
    pose[0]["people"][0]["hand_left_keypoints_2d"] = flat([(0.3, 0.4, 1.0)] * 21)  # all 21 on one spot
    with collect() as warnings:
        _, p = select_person(parse_pose(pose))
    assert p.left_hand is None and p.right_hand is not None
    assert len(warnings) == 1 and "degenerate" in warnings[0]


def test_hand_with_too_few_points_is_missing_and_no_hands_is_an_error():
    pts = [(0.0, 0.0, 0.0)] * 21
    pts[0] = (0.5, 0.5, 1.0)
    frames = parse_pose([frame(hand_left_keypoints_2d=flat(pts))])
    assert frames[0].people[0].left_hand is None
    with pytest.raises(ValueError, match="no hands in the pose"):
        select_person(frames)
    with pytest.raises(ValueError, match="has no people"):
        select_person(parse_pose([{"people": [], "canvas_width": 8, "canvas_height": 8}]))
    with pytest.raises(ValueError, match="person 3 does not exist"):
        select_person(frames, person=3)


def test_nested_lists_and_explicit_coordinates():
    nested = [[0.5, 0.5, 1.0]] * 21
    p = parse_pose([frame(hand_left_keypoints_2d=nested)], coordinates="pixels")[0].people[0]
    assert p.left_hand[0, :2].tolist() == [0.5, 0.5]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ({"canvas_width": 4}, "no 'people'"),
    ([frame(hand_left_keypoints_2d=[1.0, 2.0])], "not a multiple of 3"),
    ([frame(hand_left_keypoints_2d=flat([(0.5, 0.5, 1.0)] * 20))], "expected 21"),
    ([frame(pose_keypoints_2d=flat([(0.5, 0.5, 1.0)] * 17))], "expected 18"),
    ([], "no frames"),
])
def test_bad_pose_messages(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_pose(bad)
