"""Sequential mask expansion schedule: shrinks monotonically to the original mask; the last steps unmasked."""
from __future__ import annotations

import math

import pytest
import torch

from humanref.pipelines.hands.mask_expand import component_boxes, dilate, expansion_radii, keep_schedule, step_index


def dot_mask(h=24, w=24, y=12, x=12):
    m = torch.zeros(1, 1, h, w)
    m[0, 0, y, x] = 1.0
    return m


def naive_dilate(mask, radius):
    """float64 reference: max over every cell within Euclidean distance <= radius."""
    h, w = mask.shape[-2:]
    out = torch.zeros(h, w, dtype=torch.float64)
    src = mask[0, 0].double()
    for i in range(h):
        for j in range(w):
            best = 0.0
            for a in range(h):
                for b in range(w):
                    if (a - i) ** 2 + (b - j) ** 2 <= radius * radius:
                        best = max(best, float(src[a, b]))
            out[i, j] = best
    return out


@pytest.mark.parametrize("schedule", ["linear", "cosine", "quadratic"])
def test_radii_shrink_monotonically_to_zero(schedule):
    radii = expansion_radii(10, 6.0, schedule)
    assert radii[0] == 6.0 and radii[-1] == 0.0 and len(radii) == 10
    assert all(a >= b for a, b in zip(radii, radii[1:]))
    if schedule == "linear":
        assert radii == pytest.approx([6.0 * (1 - i / 9) for i in range(9)] + [0.0])
    if schedule == "cosine":
        assert radii[3] == pytest.approx(3.0 * (1 + math.cos(math.pi * 3 / 9)))


def test_schedule_masks_and_unmasked_final_steps():
    mask = dot_mask()
    keeps = keep_schedule(mask, steps=8, unmasked_last=2, max_radius=4.0)
    assert keeps[-2:] == [None, None] and all(k is not None for k in keeps[:-2])
    sizes = [int(k.sum()) for k in keeps[:-2]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert torch.equal(keeps[-3], mask)  # the last masked step keeps exactly the original mask
    for a, b in zip(keeps[:-3], keeps[1:-2]):
        assert bool((b <= a).all())  # nested: every mask contains the next one
    assert int(keeps[0].sum()) == sum(1 for dy in range(-4, 5) for dx in range(-4, 5) if dy * dy + dx * dx <= 16)
    assert keep_schedule(mask, 2, 2) == [None, None]
    assert torch.equal(keep_schedule(mask, 3, 0, max_radius=0.0)[0], mask)


def test_dilation_matches_naive_on_a_soft_mask():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 1, 9, 11, generator=g) > 0.85).float() * torch.rand(1, 1, 9, 11, generator=g)
    for r in (1.0, 1.5, 2.3):
        assert torch.equal(dilate(mask, r)[0, 0].double(), naive_dilate(mask, r))


def test_naive_and_bounding_box_baselines():
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 2, 3] = mask[0, 0, 3, 4] = mask[0, 0, 5, 2] = 1.0  # a diagonal pair and a separate dot
    mask[0, 0, 10:13, 9] = mask[0, 0, 12, 9:14] = 1.0  # an L shape
    keeps = keep_schedule(mask, 5, 2, blending="naive")
    assert all(torch.equal(k, mask) for k in keeps[:3])
    boxes = component_boxes(mask)
    expected = torch.zeros(16, 16)
    expected[2:4, 3:5] = 1.0  # 8-connected pair
    expected[5, 2] = 1.0
    expected[10:13, 9:14] = 1.0
    assert torch.equal(boxes[0, 0], expected)
    assert torch.equal(keep_schedule(mask, 5, 2, blending="bounding box")[0], boxes)


def test_step_index_follows_sigma():
    sigmas = torch.tensor([14.6, 8.0, 3.0, 1.0, 0.0])
    assert [step_index(sigmas, s) for s in (14.6, 8.0, 3.0, 1.0)] == [0, 1, 2, 3]
    assert step_index(sigmas, 5.0) == 1  # intermediate (second-order) sigma: the step being taken
    assert step_index(sigmas, 0.5) == 3
    assert step_index(sigmas, 20.0) == 0
    assert step_index(sigmas, 8.0 * (1 - 1e-7)) == 1  # float round-off


@pytest.mark.parametrize("kwargs, message", [
    ({"blending": "fancy"}, "blending must be one of"),
    ({"schedule": "steppy"}, "schedule must be one of"),
    ({"max_radius": -1.0}, "maximum expansion"),
    ({"unmasked_last": -1}, "unmasked final steps"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keep_schedule(dot_mask(), 4, **kwargs)
