"""pipelines/hand_canvas.py: which input a size error names (the bad-input sweep's findings)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from humanref.pipelines.hands.canvas import assemble_canvas
from humanref.pipelines.hands.generator import plan
from humanref.pipelines.hands.keypoints import parse_pose, select_person

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POSE = json.loads((REPO / "workflows" / "api" / "hands.json").read_text())["5"]["inputs"]["pose_json"]


def example_crops(size: int = 64):
    frame, person = select_person(parse_pose(EXAMPLE_POSE))
    return plan(frame, person, size, 1.5)


def test_hand_images_of_another_size_name_hand_images():
    """Images 32x32 for crops planned at 64 (and masks that match the crops): the images are wrong, so the message
    names hand_images and the planned size, not hand_masks."""
    hands = example_crops()
    n = len(hands.crops)
    assert n == 2
    with pytest.raises(ValueError, match=r"hand_images are 32x32 but the crops were planned at 64x64"):
        assemble_canvas(torch.rand(n, 32, 32, 3), torch.ones(n, 64, 64), hands)
    with pytest.raises(ValueError, match=r"hand_images are 64x48"):
        assemble_canvas(torch.rand(n, 48, 64, 3), torch.ones(n, 48, 64), hands)
    with pytest.raises(ValueError, match=r"hand_masks must be 2 mask\(s\) of 64x64"):
        assemble_canvas(torch.rand(n, 64, 64, 3), torch.ones(1, 64, 64), hands)
    canvas, keep = assemble_canvas(torch.rand(n, 64, 64, 3), torch.ones(n, 64, 64), hands)
    assert canvas.shape[:3] == keep.shape == (1, hands.height, hands.width)
