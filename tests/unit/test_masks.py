"""Mask projection onto block grids against hand-computed grids and naive float64 loop implementations."""
from __future__ import annotations

import math

import pytest
import torch
from naive import naive_parts2whole
from torch import nn

from humanref.attention import masks as M

DT = torch.float64


# ------------------------------------------------------------------------------------------------------- grids
def parts2whole_grid(height: int, width: int, tokens: int) -> tuple[int, int]:
    """The official grid rule: scale s = 2^ceil(log2(HW/N)/2), grid = (ceil(H/s), ceil(W/s)).

    The engine takes each block's grid from the block itself; this rule is the reference it must agree with.
    """
    s = 2 ** math.ceil(0.5 * math.log2(height * width / tokens))
    return math.ceil(height / s), math.ceil(width / s)


@pytest.mark.parametrize(
    "height,width,grid",
    [
        (768, 512, (96, 64)),
        (768, 512, (48, 32)),
        (768, 512, (24, 16)),
        (768, 512, (12, 8)),
        (680, 512, (85, 64)),
        (680, 512, (43, 32)),
        (680, 512, (22, 16)),
        (680, 512, (11, 8)),
    ],
)
def test_parts2whole_grid_hand_computed(height, width, grid):
    assert parts2whole_grid(height, width, grid[0] * grid[1]) == grid


def _unet_grids(h, w, levels=4):
    """Token grids of the UNet levels: a stride-2, padding-1, 3x3 conv applied to the latent repeatedly."""
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1)
    t = torch.zeros(1, 1, h, w)
    grids = [(h, w)]
    with torch.no_grad():
        for _ in range(levels - 1):
            t = conv(t)
            grids.append((t.shape[-2], t.shape[-1]))
    return grids


@pytest.mark.parametrize("pixels", [(680, 512), (768, 512), (520, 392), (1000, 744)])
def test_parts2whole_grid_matches_unet_downsampling(pixels):
    height, width = pixels
    grids = _unet_grids(height // 8, width // 8)
    if pixels == (680, 512):
        assert grids == [(85, 64), (43, 32), (22, 16), (11, 8)]
    for gh, gw in grids:
        assert parts2whole_grid(height, width, gh * gw) == (gh, gw)


# ------------------------------------------------------------------------------------------ parts2whole weights


def _masks(kind, r, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":
        return (torch.rand(r, height, width, generator=g, dtype=DT) < 0.04).to(DT)  # sparse: dilation visible
    m = torch.rand(r, height, width, generator=g, dtype=DT) * 0.3
    m[torch.rand(r, height, width, generator=g, dtype=DT) < 0.7] = 0.0  # soft with many zeros
    return m


@pytest.mark.parametrize(
    "mask_hw,grid",
    [
        ((680, 512), (85, 64)),
        ((680, 512), (43, 32)),
        ((255, 100), (85, 64)),  # non-square, aspect unlike the grid
        ((129, 50), (43, 32)),
        ((40, 30), (85, 64)),  # mask smaller than the grid (upsampling)
        ((77, 61), (43, 32)),
    ],
)
@pytest.mark.parametrize("kind", ["binary", "soft"])
def test_parts2whole_weights_match_naive(mask_hw, grid, kind):
    mask = _masks(kind, 2, *mask_hw, seed=mask_hw[0] + grid[0])
    out = M.parts2whole_weights(mask, grid)
    assert out.shape == (2, grid[0] * grid[1])
    expected = naive_parts2whole(mask, grid)
    torch.testing.assert_close(out.to(DT), expected, rtol=0, atol=1e-6)
    if kind == "binary":
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        # dilation: strictly more tokens on than the plain nearest resize samples
        h, w = grid
        sampled = sum(
            int(mask[r, (i * mask_hw[0]) // h, (j * mask_hw[1]) // w] > 0)
            for r in range(2) for i in range(h) for j in range(w)
        )
        assert 0 < sampled < int((out > 0).sum())


def test_parts2whole_binary_is_one_cell_dilation():
    mask = torch.zeros(1, 680, 512)
    mask[0, 8 * 40, 8 * 30] = 1.0  # one pixel that the nearest resize to 85x64 samples, at cell (40, 30)
    out = M.parts2whole_weights(mask, (85, 64)).reshape(85, 64)
    expected = torch.zeros(85, 64)
    expected[39:42, 29:32] = 1.0
    assert torch.equal(out, expected)


def test_parts2whole_soft_is_clamped_box_sum():
    mask = torch.zeros(1, 4, 4)
    mask[0, 1, 1] = 0.25
    mask[0, 1, 2] = 0.5
    mask[0, 2, 2] = 0.5
    out = M.parts2whole_weights(mask, (4, 4)).reshape(4, 4)
    expected = torch.tensor(
        [
            [0.25, 0.75, 0.75, 0.5],
            [0.25, 1.0, 1.0, 1.0],  # (1,1) and (1,2): 0.25+0.5+0.5 = 1.25 -> clamped to 1
            [0.25, 1.0, 1.0, 1.0],
            [0.0, 0.5, 0.5, 0.5],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------------ area weights
def naive_block_means(mask, grid):
    r, big_h, big_w = mask.shape
    h, w = grid
    bh, bw = big_h // h, big_w // w
    out = torch.zeros(r, h * w, dtype=DT)
    for ri in range(r):
        for i in range(h):
            for j in range(w):
                s = 0.0
                for y in range(i * bh, (i + 1) * bh):
                    for x in range(j * bw, (j + 1) * bw):
                        s += float(mask[ri, y, x])
                out[ri, i * w + j] = s / (bh * bw)
    return out


@pytest.mark.parametrize("mask_hw,grid", [((170, 128), (85, 64)), ((129, 96), (43, 32)), ((48, 16), (12, 8))])
@pytest.mark.parametrize("kind", ["binary", "soft"])
def test_area_weights_are_block_means(mask_hw, grid, kind):
    mask = _masks(kind, 2, *mask_hw, seed=mask_hw[1])
    out = M.area_weights(mask, grid)
    assert out.shape == (2, grid[0] * grid[1])
    torch.testing.assert_close(out.to(DT), naive_block_means(mask, grid), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask_hw,grid", [((680, 512), (43, 32)), ((100, 77), (22, 16)), ((30, 20), (43, 32))])
def test_area_weights_sanity_off_multiple(mask_hw, grid):
    soft = _masks("soft", 2, *mask_hw, seed=5)
    out = M.area_weights(soft, grid)
    assert out.shape == (2, grid[0] * grid[1])
    assert out.min() >= 0.0 and out.max() <= 1.0
    ones = M.area_weights(torch.ones(1, *mask_hw), grid)
    torch.testing.assert_close(ones, torch.ones(1, grid[0] * grid[1]), rtol=0, atol=1e-6)
    zeros = M.area_weights(torch.zeros(1, *mask_hw), grid)
    assert torch.equal(zeros, torch.zeros(1, grid[0] * grid[1]))


# ------------------------------------------------------------------------------------------------ project_mask
def test_project_mask_dispatches_rules():
    mask = _masks("binary", 2, 170, 128, seed=9)
    p2w = M.project_mask(mask, (85, 64))  # default rule is parts2whole
    torch.testing.assert_close(p2w.to(DT), naive_parts2whole(mask, (85, 64)), rtol=0, atol=1e-6)
    area = M.project_mask(mask, (85, 64), rule="area")
    torch.testing.assert_close(area.to(DT), naive_block_means(mask, (85, 64)), rtol=0, atol=1e-6)


def test_project_mask_rejects_2d_mask():
    with pytest.raises(ValueError, match=r"mask must be \[references, height, width\].*\(680, 512\)"):
        M.project_mask(torch.ones(680, 512), (85, 64))


def test_project_mask_rejects_unknown_rule():
    with pytest.raises(ValueError, match=r"unknown mask rule 'maxpool'.*parts2whole.*area"):
        M.project_mask(torch.ones(1, 16, 16), (4, 4), rule="maxpool")


# --------------------------------------------------------------------------------------------- region masks
def test_region_allowed_any_overlap_per_token():
    """Hand-computed: an 8x8 mask on a 4x4 grid, each token covers 2x2 pixels."""
    regions = torch.zeros(2, 8, 8)
    regions[0, 0:3, 0:8] = 1.0  # rows 0-2: token rows 0 and 1 (row 1 only partly)
    regions[1, 7, 7] = 1.0  # a single pixel: the bottom-right token
    allowed = M.region_allowed(regions, (4, 4))
    assert allowed.shape == (16, 2) and allowed.dtype == torch.bool
    expected0 = torch.zeros(4, 4, dtype=torch.bool)
    expected0[0:2] = True
    expected1 = torch.zeros(4, 4, dtype=torch.bool)
    expected1[3, 3] = True
    assert torch.equal(allowed[:, 0], expected0.flatten())
    assert torch.equal(allowed[:, 1], expected1.flatten())


def test_region_allowed_odd_grid_and_bad_shape():
    regions = torch.ones(1, 13, 7)
    assert M.region_allowed(regions, (3, 5)).all()
    with pytest.raises(ValueError, match="region masks"):
        M.region_allowed(torch.ones(8, 8), (2, 2))
